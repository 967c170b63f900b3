"""Run under torchrun with 4 ranks, after tests/workers/moe_train.py: its ep=2 run with the
distributed optimizer, written at world 2 (DP 2, expert-DP 1), continues from the step-2
checkpoint the test copied to <root>/zero_dp4 at world 4 (DP 4, expert-DP 2: each expert's
state now cut over two ranks). Emits how the optimizer cuts its state on each rank, then the
resumed run's metrics."""

import sys

from tests.workers.moe_train import job, optimizer_shards, run


def main(root):
    optimizer_shards(root)
    run("zero_dp4", job(root, "teacher", "zero_dp4", 2, save_interval=2,
                        distributed_optimizer=True))


if __name__ == "__main__":
    main(*sys.argv[1:])

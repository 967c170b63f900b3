"""Run under torchrun with 2 ranks: calibration importance at TP=2, PP=2 and DP=2.

Each layout's global importance is saved by every rank to <out>/<layout>-rank<r>.pt.
"""

import sys

import torch

from nemo_minitron.importance.calibrate import batches_forward_loop, calibrate
from nemo_minitron.runtime import dist
from nemo_minitron.runtime.shard import load_checkpoint

from tests.workers._emit import emit


def main(ckpt_dir, batches_path, out):
    batches = torch.load(batches_path)
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2), ("dp2", 1, 1)):
        dist.init(tp, pp)
        from megatron.core import parallel_state as ps

        shard, _ = load_checkpoint(ckpt_dir)
        dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        imp = calibrate(shard, batches_forward_loop(shard, batches[r::dp], None))
        rank = torch.distributed.get_rank()
        imp.save(f"{out}/{name}-rank{rank}.safetensors")
        emit({"layout": name, "rank": rank, "samples": imp.meta["samples"]})
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])

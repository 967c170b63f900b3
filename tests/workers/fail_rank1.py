"""A stage whose rank 1 fails: `python fail_rank1.py <stage> [hydra overrides]` on 2 ranks.

Runs the real entry point (`nemo_minitron.cli.main.main`, Hydra config and validation included)
with the stage's run function replaced. FAIL_AT=collective (default): every rank starts the process
group, then rank 1 raises while rank 0 waits for it in a collective. FAIL_AT=init: rank 1 raises
before joining the process group, so rank 0 waits in the rendezvous, where no peer connection
breaks to wake it: only the launcher (torchrun's agent, ``srun --kill-on-bad-exit``) can end it
before the timeout. Either way the job must exit non-zero promptly.
"""

import importlib
import os
import sys

import torch

from nemo_minitron.cli import main as cli
from nemo_minitron.runtime import dist


def run(job):
    if os.environ.get("FAIL_AT") == "init" and dist.read_env().rank == 1:
        raise RuntimeError("injected failure on rank 1 before init")
    env = dist.init(job.parallel.tp, job.parallel.pp, job.parallel.seed, job.parallel.timeout_s)
    if env.rank == 1:
        raise RuntimeError("injected failure on rank 1")
    torch.distributed.barrier()  # rank 1 never arrives
    return {}


if __name__ == "__main__":
    module, _, name = cli.STAGES[sys.argv[1]].run.partition(":")
    setattr(importlib.import_module(module), name, run)
    cli.main(sys.argv[1:])

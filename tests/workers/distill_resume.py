"""Run under torchrun with 2 ranks: 4 distillation steps at DP=2, saving at step 2.

``run`` either starts fresh or resumes from the checkpoints already under it (a run saved at
DP=1). With a fifth argument ``distributed`` the optimizer state is sharded over the two ranks
(megatron-core's distributed optimizer). With a sixth, ``again``, a copy of the step-2
checkpoint is then resumed at DP=2 under ``<run>_again`` and rank 0 emits whether it ends
bit-identical (same layout and threads: exact by construction)."""

import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from nemo_minitron.config.schema import TrainConfig
from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.distill.trainer import train

from tests.workers._emit import emit
from tests.workers.distill_layouts import job


def run_once(student, teacher, data, run, mode):
    j = job(student, teacher, data, run, 1, 1, steps=4)
    j.train = TrainConfig(**{**vars(j.train), "save_interval": 2,
                             "distributed_optimizer": mode == "distributed"})
    return train(j, "distill")


def main(student, teacher, data, run, mode="replicated", again=None):
    run_once(student, teacher, data, run, mode)
    if again != "again":
        return
    rank0 = int(os.environ["RANK"]) == 0
    copy = Path(f"{run}_again")
    if rank0:
        shutil.copytree(Path(run) / "checkpoints" / "step_0000002",
                        copy / "checkpoints" / "step_0000002")
    tdist.barrier()
    run_once(student, teacher, data, str(copy), mode)
    if rank0:
        a, b = ckpt.Checkpoint(Path(run) / "final"), ckpt.Checkpoint(copy / "final")
        emit({"again_equal": all(torch.equal(a.get(k), b.get(k)) for k in a.keys()),
              "steps": b.meta["step"]})


if __name__ == "__main__":
    main(*sys.argv[1:])

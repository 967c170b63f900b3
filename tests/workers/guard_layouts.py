"""Run under torchrun with 2 ranks: resumable state and the numerical guard at TP=2 and PP=2.

For TP=2 and PP=2, each with fp32 + the distributed optimizer and with bf16 + the plain one:
4 steps saving at step 2, then a copy of the step-2 checkpoint resumed to the end; rank 0 emits
whether the two final checkpoints are bitwise equal, and which were written sharded. Then PP=2 at train.lr=1e6 with
train.skip_nonfinite_steps=1: every rank emits the TrainingDiverged message it got.
"""

import dataclasses
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from nemo_minitron.config.schema import TrainConfig
from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.convert import sharded as sharded_ckpt
from nemo_minitron.distill.guard import TrainingDiverged
from nemo_minitron.distill.trainer import train

from tests.workers._emit import emit
from tests.workers.distill_layouts import job


def make(student, teacher, data, out, tp, pp, dtype="fp32", steps=4, **train_kw):
    j = job(student, teacher, data, str(out), tp, pp, steps=steps)
    j.model = dataclasses.replace(j.model, dtype=dtype)
    j.train = TrainConfig(**{**vars(j.train), "save_interval": 2, **train_kw})
    return j


def main(student, teacher, data, out):
    out = Path(out)
    rank0 = int(os.environ["RANK"]) == 0
    for layout, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2)):
        for variant, dtype, sharded in (("fp32_distributed", "fp32", True), ("bf16", "bf16", False)):
            name = f"{layout}_{variant}"
            train(make(student, teacher, data, out / name, tp, pp, dtype,
                       distributed_optimizer=sharded), "distill")
            if rank0:
                saved = out / name / "checkpoints" / "step_0000002"
                shutil.copytree(saved, out / f"{name}_resumed" / "checkpoints" / saved.name)
            tdist.barrier()
            res = train(make(student, teacher, data, out / f"{name}_resumed", tp, pp, dtype,
                             distributed_optimizer=sharded), "distill")
            if rank0:
                a = ckpt.Checkpoint(out / name / "final")
                b = ckpt.Checkpoint(res["final"])
                emit({"case": name, "step": b.meta["step"],
                      "sharded_step": sharded_ckpt.is_sharded(saved),
                      "sharded_final": a.sharded is not None or b.sharded is not None,
                      "equal": sorted(a.keys()) == sorted(b.keys())
                      and all(torch.equal(a.get(k), b.get(k)) for k in a.keys())})
    message = None
    try:
        train(make(student, teacher, data, out / "diverged", 1, 2, steps=30, lr=1e6, min_lr=0.0,
                   save_interval=1, keep_checkpoints=2, skip_nonfinite_steps=1), "distill")
    except TrainingDiverged as e:
        message = str(e)
    emit({"case": "diverged", "rank": tdist.get_rank(), "message": message})


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Run under torchrun with 2 ranks at TP=2: kill -9 inside a sharded save, then resume.

``first``: a 6-step run saving every 2 steps (sharded checkpoints), the uninterrupted reference
under ``<out>/full``; then the same run under ``<out>/killed`` whose TP rank 1 SIGKILLs itself
inside the step-4 save, right after writing its own slices (rank 0 waits for it, so the save's
temporary directory holds that file and no index). The launch dies there.
``again``: the killed run relaunched; rank 0 emits its steps and whether its final weights equal
the reference's bit for bit.
"""

import os
import signal
import sys
from pathlib import Path

import torch

from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.distill.trainer import train
from nemo_minitron.runtime import sharded_save

from tests.helpers.metrics import metrics
from tests.workers._emit import emit
from tests.workers.guard_layouts import make

KILL_IN = ".step_0000004.partial-"


def die_inside_the_step4_save() -> None:
    real = sharded_save.write_local

    def write_local(stage, tmp):
        entries = real(stage, tmp)
        if KILL_IN in tmp.name and int(os.environ["RANK"]) == 1:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return entries

    sharded_save.write_local = write_local


def main(student, teacher, data, out, phase):
    out = Path(out)
    if phase == "first":
        train(make(student, teacher, data, out / "full", 2, 1, steps=6), "distill")
        die_inside_the_step4_save()
    res = train(make(student, teacher, data, out / "killed", 2, 1, steps=6), "distill")
    if int(os.environ["RANK"]) == 0:
        a, b = ckpt.Checkpoint(out / "full" / "final"), ckpt.Checkpoint(res["final"])
        emit({"equal": sorted(a.keys()) == sorted(b.keys())
              and all(torch.equal(a.get(k), b.get(k)) for k in a.keys()),
              "steps": [r["step"] for r in metrics(out / "killed") if "loss" in r]})


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Run under torchrun with 2 ranks: distillation from an offline teacher cache at PP=2 and DP=2
(each rank looks its samples up by number). Emits each layout's per-step metrics (rank 0)."""

import sys

import torch

from nemo_minitron.distill.trainer import run_distill
from nemo_minitron.config.schema import KDConfig

from tests.helpers.metrics import metrics, series
from tests.workers._emit import emit
from tests.workers.distill_layouts import job


def main(student, teacher, data, cache, out):
    for name, pp in (("pp2", 2), ("dp2", 1)):
        j = job(student, teacher, data, f"{out}/{name}", 1, pp)
        j.kd = KDConfig(teacher=teacher, lm_weight=0.0, chunk_tokens=16, teacher_cache=cache)
        res = run_distill(j)
        if torch.distributed.get_rank() == 0:
            emit({"layout": name, "val_loss": res["val_loss"],
                  **series(metrics(j.output), ("loss", "kd", "grad_norm"))})


if __name__ == "__main__":
    main(*sys.argv[1:])

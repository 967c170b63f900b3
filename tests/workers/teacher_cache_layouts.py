"""Run under torchrun with 2 ranks: distillation from an offline teacher cache at PP=2 and DP=2
(each rank looks its samples up by number). Emits each layout's per-step metrics (rank 0)."""

import json
import sys
from pathlib import Path

import torch
from _emit import emit

from nemo_minitron.cli import distill
from nemo_minitron.config.schema import KDConfig
from distill_layouts import job


def main(student, teacher, data, cache, out):
    for name, pp in (("pp2", 2), ("dp2", 1)):
        j = job(student, teacher, data, f"{out}/{name}", 1, pp)
        j.kd = KDConfig(teacher=teacher, lm_weight=0.0, chunk_tokens=16, teacher_cache=cache)
        res = distill.run(j)
        if torch.distributed.get_rank() == 0:
            rows = [json.loads(x) for x in (Path(j.output) / "metrics.jsonl").read_text().splitlines()]
            emit({"layout": name, "val_loss": res["val_loss"],
                  **{k: [r[k] for r in rows if k in r] for k in ("loss", "kd", "grad_norm")}})


if __name__ == "__main__":
    main(*sys.argv[1:])

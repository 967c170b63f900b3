"""Run under torchrun with 2 ranks: a few distillation steps at TP=2, PP=2 and DP=2.

Emits each layout's per-step training loss (read back from metrics.jsonl) and final val loss.
"""

import json
import sys
from pathlib import Path

import torch
from _emit import emit

from nemo_minitron.config.schema import (DataConfig, DistillJob, KDConfig, ModelConfig,
                                         ParallelConfig, TrainConfig)
from nemo_minitron.distill.loop import train


def job(student, teacher, data, out, tp, pp, steps=3):
    return DistillJob(model=ModelConfig(name="tiny", checkpoint=student),
                      parallel=ParallelConfig(tp=tp, pp=pp),
                      data=DataConfig(prefix=data, seq_length=32, valid_fraction=0.1),
                      train=TrainConfig(steps=steps, global_batch_size=4, micro_batch_size=1,
                                        lr=1e-3, min_lr=1e-4, warmup_steps=1, log_interval=1,
                                        eval_interval=0, eval_batches=2, tensorboard=False),
                      kd=KDConfig(teacher=teacher, lm_weight=0.5, chunk_tokens=16),
                      output=out)


def main(student, teacher, data, out):
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2), ("dp2", 1, 1)):
        res = train(job(student, teacher, data, f"{out}/{name}", tp, pp), teacher,
                    dict(logit_weight=1.0, lm_weight=0.5, chunk_tokens=16), "distill")
        if torch.distributed.get_rank() == 0:
            rows = [json.loads(x) for x in Path(f"{out}/{name}/metrics.jsonl").read_text().splitlines()]
            emit({"layout": name, "loss": [r["loss"] for r in rows if "loss" in r],
                  "grad_norm": [r["grad_norm"] for r in rows if "grad_norm" in r],
                  "val_loss": res["val_loss"]})


if __name__ == "__main__":
    main(*sys.argv[1:])

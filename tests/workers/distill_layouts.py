"""Run under torchrun with 2 ranks: a few distillation steps at TP=2, PP=2 and DP=2, then TP=2 and
PP=2 again with intermediate hidden-state and embedding losses at fixed weights (``HIDDEN_KD``),
and PP=2 with dynamic weights (``DYNAMIC_KD``); then PP=2 with pairs split over the two stages
(``CROSS_KD``, fixed and dynamic weights); then TP=2 and PP=2 with the logit loss alone, where the
output layers run inside its chunks (``FUSED_KD``).

Emits each layout's per-step metrics (read back from metrics.jsonl) and final val loss.
"""

import sys

import torch

from nemo_minitron.config.schema import (DataConfig, DistillJob, KDConfig, ModelConfig,
                                         ParallelConfig, TrainConfig)
from nemo_minitron.distill.trainer import train

from tests.helpers.metrics import metrics, series
from tests.workers._emit import emit


# student layers 0, 1 (2 layers) against teacher layers 1, 3 (of 4): under PP=2 each pair sits on
# one stage (stage 0: student 0, teacher 0-1; stage 1: student 1, teacher 2-3)
HIDDEN_KD = dict(hidden_pairs=[[0, 1], [1, 3]], embedding_weight=0.5, hidden_dynamic=False)
DYNAMIC_KD = dict(HIDDEN_KD, hidden_dynamic=True)
# under PP=2: student 0 (stage 0) with teacher 3 (stage 1) carries the projected student state
# forward, student 1 (stage 1) with teacher 0 (stage 0) carries the teacher state, and student 0
# with teacher 1 stays on stage 0 (its loss rides on the stage-0 output next to the carry)
CROSS_KD = dict(hidden_pairs=[[0, 3], [1, 0], [0, 1]], embedding_weight=0.5, hidden_dynamic=False)
CROSS_DYNAMIC_KD = dict(CROSS_KD, hidden_dynamic=True)
# the logit loss alone: the output layers are folded into its chunks (kd.fused_output), the
# vocabulary split over TP=2 or the output layer on the last of two stages
FUSED_KD = dict(lm_weight=0.0)


def job(student, teacher, data, out, tp, pp, steps=3, **kd):
    return DistillJob(model=ModelConfig(name="tiny", checkpoint=student),
                      parallel=ParallelConfig(tp=tp, pp=pp),
                      data=DataConfig(prefix=data, seq_length=32, valid_fraction=0.1),
                      train=TrainConfig(steps=steps, global_batch_size=4, micro_batch_size=1,
                                        lr=1e-3, min_lr=1e-4, warmup_steps=1, log_interval=1,
                                        eval_interval=0, eval_batches=2, tensorboard=False),
                      kd=KDConfig(**{"teacher": teacher, "lm_weight": 0.5, "chunk_tokens": 16,
                                     **kd}),
                      output=out)


def main(student, teacher, data, out):
    for name, tp, pp, kd in (("tp2", 2, 1, {}), ("pp2", 1, 2, {}), ("dp2", 1, 1, {}),
                             ("tp2_hidden", 2, 1, HIDDEN_KD), ("pp2_hidden", 1, 2, HIDDEN_KD),
                             ("pp2_dynamic", 1, 2, DYNAMIC_KD), ("pp2_cross", 1, 2, CROSS_KD),
                             ("pp2_cross_dynamic", 1, 2, CROSS_DYNAMIC_KD),
                             ("tp2_fused", 2, 1, FUSED_KD), ("pp2_fused", 1, 2, FUSED_KD)):
        run(name, job(student, teacher, data, f"{out}/{name}", tp, pp, **kd))


def run(name, j):
    """Train ``j`` and emit its per-step metrics (rank 0) as the row of layout ``name``."""
    res = train(j, "distill")
    if torch.distributed.get_rank() == 0:
        keys = ("loss", "grad_norm", "hidden", "emb", "alpha")
        emit({"layout": name, "val_loss": res["val_loss"], **series(metrics(j.output), keys)})


if __name__ == "__main__":
    main(*sys.argv[1:])

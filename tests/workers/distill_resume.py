"""Run under torchrun with 2 ranks: 4 distillation steps at DP=2, saving at step 2.

``run`` either starts fresh or resumes from the checkpoints already under it (a run saved at
DP=1). With a fifth argument ``distributed`` the optimizer state is sharded over the two ranks
(megatron-core's distributed optimizer)."""

import sys

from distill_layouts import job

from nemo_minitron.config.schema import TrainConfig
from nemo_minitron.distill.loop import train


def main(student, teacher, data, run, mode="replicated"):
    j = job(student, teacher, data, run, 1, 1, steps=4)
    j.train = TrainConfig(**{**vars(j.train), "save_interval": 2,
                             "distributed_optimizer": mode == "distributed"})
    train(j, teacher, dict(logit_weight=1.0, lm_weight=0.5, chunk_tokens=16), "distill")


if __name__ == "__main__":
    main(*sys.argv[1:])

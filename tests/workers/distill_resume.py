"""Run under torchrun with 2 ranks: resume a distillation run saved at DP=1 with DP=2."""

import sys

from distill_layouts import job

from nemo_minitron.config.schema import TrainConfig
from nemo_minitron.distill.loop import train


def main(student, teacher, data, run):
    j = job(student, teacher, data, run, 1, 1, steps=4)
    j.train = TrainConfig(**{**vars(j.train), "save_interval": 2})
    train(j, teacher, dict(logit_weight=1.0, lm_weight=0.5, chunk_tokens=16), "distill")


if __name__ == "__main__":
    main(*sys.argv[1:])

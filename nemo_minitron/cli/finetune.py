"""`minitron finetune`: teacher correction, i.e. LM-loss training of the teacher on the
distillation corpus before it is pruned and distilled from (same loop as distillation)."""

from .main import hydra_app


def run(job) -> dict:
    from ..distill.loop import train

    return train(job, None, dict(logit_weight=0.0, lm_weight=1.0), "finetune")


def main():
    return hydra_app("finetune", run)

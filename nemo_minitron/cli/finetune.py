"""`minitron finetune`: teacher correction, i.e. LM-loss training of the teacher on the
distillation corpus before it is pruned and distilled from (the same trainer as distillation,
without a teacher)."""

from .main import hydra_app


def run(job) -> dict:
    from ..distill.trainer import train

    return train(job, "finetune")


def main():
    return hydra_app("finetune", run)

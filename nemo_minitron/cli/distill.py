"""`minitron distill`: train a (pruned) student from a co-located, frozen teacher, or from the
teacher's cached top-k logits (kd.teacher_cache); the trainer reads job.kd itself."""

from .main import hydra_app


def run(job) -> dict:
    from ..distill.trainer import train

    return train(job, "distill")


def main():
    return hydra_app("distill", run)

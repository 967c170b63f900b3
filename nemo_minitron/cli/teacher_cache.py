"""`minitron teacher_cache`: the teacher's top-k log-probabilities of a distillation's tokens, once."""

from .main import hydra_app


def run(job) -> dict:
    from ..distill.teacher_cache import build

    return build(job)


def main():
    return hydra_app("teacher_cache", run)

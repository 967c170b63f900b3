"""`minitron prune`: activation-importance width/depth pruning to explicit targets."""

from .main import hydra_app


def run(job) -> dict:
    from ..pruning.run import prune

    return prune(job)


def main():
    return hydra_app("prune", run)

"""`minitron search`: candidate architectures within a parameter budget, each pruned from one set
of importance scores and briefly distilled, ranked by validation loss (or a task)."""

from .main import hydra_app


def run(job) -> dict:
    from ..search.run import run_search

    return run_search(job)


def main():
    return hydra_app("search", run)

"""`minitron pipeline`: teacher correction -> prune -> distill -> evaluate -> export, chained
over rounds, resumable. With no arguments it compresses the embedded SmolLM2-135M."""

from .main import hydra_app


def run(job) -> dict:
    from ..pipeline import run_pipeline

    return run_pipeline(job)


def main():
    return hydra_app("pipeline", run)

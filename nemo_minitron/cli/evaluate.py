"""`minitron evaluate`: validation loss and perplexity of a checkpoint, at any TP/PP/DP layout."""

import datetime
import logging
from pathlib import Path

from .main import hydra_app

log = logging.getLogger(__name__)


def run(job) -> dict:
    from ..artifacts.evaluation import write_eval
    from ..evaluate.run import evaluate_checkpoint
    from ..runtime import dist

    result = evaluate_checkpoint(job.model.checkpoint, job.parallel, job.data, job.eval,
                                 job.model.dtype)
    if dist.is_rank0():
        out = Path(job.output) if job.output else default_output()
        out.parent.mkdir(parents=True, exist_ok=True)
        write_eval(out, result)  # whole or absent, never cut
        from ..report.stages import evaluate_report

        md = evaluate_report(out.with_suffix(".md"), result)
        log.info("results: %s (and %s)", out, md.name)
    return result


def default_output() -> Path:
    """Without output=: outputs/evaluate/<time>/eval_results.json, made once results exist
    (Hydra's own run directory is off, so a failed evaluation leaves nothing behind)."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return Path("outputs") / "evaluate" / stamp / "eval_results.json"


def main():
    return hydra_app("evaluate", run)

"""Step bookkeeping shared by the jobs that chain recipe steps (pipeline, search).

A step's output is complete when its checkpoint's ``minitron.json`` (written last, atomically) or
its results file exists; complete steps are skipped, so an interrupted job resumes where it
stopped. Results files are written by rank 0 only, then every rank waits and reads them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from .artifacts.evaluation import read_eval, write_eval
from .artifacts.pipeline_files import read_stage_seconds, write_stage_seconds
from .convert import checkpoint as ckpt
from .evaluate import reuse
from .evaluate.run import evaluate_checkpoint
from .runtime import dist

log = logging.getLogger(__name__)


def complete(path: Path) -> bool:
    return (Path(path) / ckpt.META).is_file()


def on_rank0(write) -> None:
    """``write()`` on rank 0; every rank returns once it is done (and the file is there)."""
    if dist.is_rank0():
        write()
    dist.barrier()


class Steps:
    """Runs named recipe steps unless done; records how long each one took in this invocation
    and, with ``record`` (a JSON file, ``stage_seconds.json``), over every invocation of a resumed
    job: a job killed and relaunched still reports what each of its steps took."""

    def __init__(self, record: Path | None = None):
        self.seconds: dict[str, float] = {}
        self.record = None if record is None else Path(record)

    def recorded(self) -> dict[str, float]:
        """Each completed step's seconds, over all invocations (this one's included)."""
        done = read_stage_seconds(self.record) if self.record else {}
        return {**done, **self.seconds}

    def run(self, name: str, done: bool, fn) -> None:
        if done:
            if dist.is_rank0():
                log.info("[%s] complete, skipped", name)
            return
        t = time.time()
        if dist.is_rank0():
            log.info("[%s] running", name)
        fn()
        self.seconds[name] = round(time.time() - t, 1)
        if self.record is not None and dist.is_rank0():
            write_stage_seconds(self.record, self.recorded())

    def evaluate(self, name: str, checkpoint, path: Path, job, ev=None) -> dict:
        """Validation loss (and tasks) of ``checkpoint`` into ``path``; returns the results. A
        results file made with other evaluation settings (``eval.limit``, ``eval.tasks``...; kept
        in it as ``asked``) is made again."""
        path = Path(path)
        asked = reuse.settings(job.data, ev or job.eval, job.parallel.seed)

        def evaluate():
            result = evaluate_checkpoint(str(checkpoint), job.parallel, job.data, ev or job.eval,
                                         job.model.dtype)
            on_rank0(lambda: write_eval(path, {**result, "asked": asked}))

        kept = read_eval(path).raw if path.is_file() else None
        if kept is not None:
            was = _asked(kept)
            diff = ", ".join(f"{k} {was[k]} -> {asked[k]}" for k in asked
                             if k in was and was[k] != asked[k])
            if diff:
                kept = None
                if dist.is_rank0():
                    log.info("[%s] made with other settings (%s): evaluating again", name, diff)
        self.run(name, kept is not None, evaluate)
        return kept if kept is not None else read_eval(path).raw


def _asked(result: dict) -> dict:
    """The settings a results file was made with: its ``asked`` record, or for a file written
    before there was one, the task settings it carries."""
    if "asked" in result:
        return result["asked"]
    if not result.get("tasks"):
        return {"tasks": []}
    settings = result["tasks"].get("settings") or {}
    return {k: settings[k] for k in ("tasks", "limit", "num_fewshot", "fewshot_seed")
            if k in settings}


def with_checkpoint(model, checkpoint):
    return dataclasses.replace(model, checkpoint=str(checkpoint))

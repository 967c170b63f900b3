"""Stage bookkeeping shared by the jobs that chain stages (pipeline, search).

A stage's output is complete when its checkpoint's ``minitron.json`` (written last, atomically) or
its results file exists; complete stages are skipped, so an interrupted job resumes where it
stopped. Results files are written by rank 0 only, then every rank waits and reads them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from .convert import checkpoint as ckpt

log = logging.getLogger(__name__)


def complete(path: Path) -> bool:
    return (Path(path) / ckpt.META).is_file()


def write_atomic(path, write) -> Path:
    """``write(tmp_path)`` next to ``path``, then rename: readers see the old file or the whole
    new one, never a half-written file. The temporary name is unique (jobs of a search multirun
    write the same files at once); one left by a killed process is removed by the next run."""
    path = Path(path)
    tmp = ckpt.partial_name(path)
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write
    return path


def write_text_atomic(path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj) -> None:
    """Atomic JSON write on rank 0; all ranks return once the file is there."""
    from .runtime import dist

    if dist.is_rank0():
        write_text_atomic(path, json.dumps(obj, indent=2, default=str))
    dist.barrier()


class Stages:
    """Runs named stages unless done; records how long each one took in this invocation and,
    with ``record`` (a JSON file), over every invocation of a resumed job: a job killed and
    relaunched still reports what each of its stages took."""

    def __init__(self, record: Path | None = None):
        self.seconds: dict[str, float] = {}
        self.record = None if record is None else Path(record)

    def recorded(self) -> dict[str, float]:
        """Each completed stage's seconds, over all invocations (this one's included)."""
        try:
            done = json.loads(self.record.read_text()) if self.record else {}
        except (OSError, ValueError):  # none yet (or damaged: timings are not worth a stop)
            done = {}
        return {**done, **self.seconds}

    def run(self, name: str, done: bool, fn) -> None:
        from .runtime import dist

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
            write_text_atomic(self.record, json.dumps(self.recorded(), indent=2))

    def evaluate(self, name: str, checkpoint, path: Path, job, ev=None) -> dict:
        """Validation loss (and tasks) of ``checkpoint`` into ``path``; returns the results."""
        from .evaluate.run import evaluate_checkpoint

        path = Path(path)
        self.run(name, path.is_file(), lambda: write_json(path, evaluate_checkpoint(
            str(checkpoint), job.parallel, job.data, ev or job.eval, job.model.dtype)))
        return json.loads(path.read_text())


def with_checkpoint(model, checkpoint):
    return dataclasses.replace(model, checkpoint=str(checkpoint))


def task_scores(result: dict, metric: str = "acc_norm") -> dict[str, float]:
    """Per-task ``metric`` of an evaluation result ({} without tasks)."""
    return {t: float(r[metric]) for t, r in result.get("tasks", {}).get("results", {}).items()
            if metric in r}

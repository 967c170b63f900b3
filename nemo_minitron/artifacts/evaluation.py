"""Evaluation results files (``eval_*.json``, ``eval_results.json``): what ``evaluate_checkpoint``
returns, written whole, read back with named fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .atomic import read_json, write_json


@dataclass
class EvalResults:
    loss: float | None = None
    perplexity: float | None = None
    tokens: int | None = None
    checkpoint: str | None = None
    seconds: float | None = None
    tasks: dict = field(default_factory=dict)  # {"results": {task: {...}}, "settings": ...}
    raw: dict = field(default_factory=dict)  # the whole file, for judge.task_rows

    def task_scores(self, metric: str = "acc_norm") -> dict[str, float]:
        """Per-task ``metric`` ({} without tasks)."""
        return task_scores(self.raw, metric)

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResults":
        num = lambda k: None if d.get(k) is None else float(d[k])  # noqa: E731
        return cls(num("loss"), num("perplexity"), d.get("tokens"), d.get("checkpoint"),
                   num("seconds"), d.get("tasks") or {}, d)


def task_scores(result: dict, metric: str = "acc_norm") -> dict[str, float]:
    """Per-task ``metric`` of a result dict ({} without tasks)."""
    return {t: float(r[metric]) for t, r in result.get("tasks", {}).get("results", {}).items()
            if metric in r}


def write_eval(path, result: dict) -> Path:
    """One evaluation, as JSON (whole or absent, never cut)."""
    return write_json(path, result, default=str)


def read_eval(path) -> EvalResults:
    """An evaluation results file; ``ValueError`` when it is none."""
    data = read_json(path)
    if not isinstance(data, dict) or ("loss" not in data and "tasks" not in data):
        raise ValueError(f"{path}: not a `minitron evaluate` results file (no 'loss' or 'tasks')")
    try:
        res = EvalResults.from_dict(data)
        if not isinstance(res.tasks, dict) or not isinstance(res.tasks.get("results", {}), dict):
            raise TypeError("'tasks' must map 'results' to {task: scores}")
        for metric in ("acc", "acc_norm", "acc_norm_stderr", "chance"):
            res.task_scores(metric)
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: a damaged results file ({e}); evaluate the checkpoint again "
                         "with `minitron evaluate`") from None
    return res

"""``metrics.jsonl``: one JSON object per logged step, appended while a run trains."""

from __future__ import annotations

import json
from pathlib import Path

METRICS = "metrics.jsonl"


def metrics_line(step: int, metrics: dict) -> str:
    return json.dumps({"step": step, **metrics}) + "\n"


def append_metrics(f, step: int, metrics: dict) -> None:
    """One row to an open metrics file (kept open by the logger), flushed for live readers."""
    f.write(metrics_line(step, metrics))
    f.flush()


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl; a half-written last line of a running job is skipped."""
    rows = []
    for line in Path(path).read_text(errors="replace").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows

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


# logged as numbers by the trainer (what reports and resume read)
NUMBERS = ("loss", "kd", "lm", "hidden", "emb", "val_loss", "lr", "grad_norm", "tokens_per_s")


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl. A line that is not a JSON object is skipped: the half-written
    last line of a running job, or of a killed one that a resume appended to. A row whose step or
    losses are not numbers is a damaged file: ``ValueError`` naming the line."""
    rows = []
    for i, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):
            continue
        bad = [k for k in ("step",) + NUMBERS if k in row and
               (isinstance(row[k], bool) or not isinstance(row[k], (int, float))
                or (k == "step" and not isinstance(row[k], int)))]
        if bad:
            raise ValueError(f"{path}:{i}: {bad[0]}={row[bad[0]]!r} is not a number; this "
                             "metrics file was edited or damaged (each line is one JSON object "
                             "written by the trainer)")
        rows.append(row)
    return rows

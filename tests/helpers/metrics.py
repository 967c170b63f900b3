"""Reading back what runs log: JSON-lines files, and a training run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path) -> list[dict]:
    """One dict per line of a JSON-lines file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def metrics(run) -> list[dict]:
    """The rows of ``<run>/metrics.jsonl`` (training steps and evaluations), in logged order."""
    return read_jsonl(Path(run) / "metrics.jsonl")


def series(rows: list[dict], keys) -> dict[str, list]:
    """Per key, its values over the rows that log it (``{"loss": [...], ...}``)."""
    return {k: [r[k] for r in rows if k in r] for k in keys}

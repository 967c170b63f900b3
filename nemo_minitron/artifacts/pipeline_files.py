"""The pipeline's own files: ``summary.json`` (per round: parameters, losses, tasks; wall time)
and ``stage_seconds.json`` (each finished stage's seconds over every invocation of a resumed job)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .atomic import read_json, write_json

SUMMARY, STAGE_SECONDS = "summary.json", "stage_seconds.json"


@dataclass
class RoundRecord:
    """One round as summary.json records it (the fields readers use; the rest stays in raw)."""

    name: str
    student_params: int | None = None
    val_loss: dict[str, float] = field(default_factory=dict)  # teacher / pruned / distilled
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)  # who -> task -> acc_norm
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "RoundRecord":
        return cls(d["name"], (d.get("params") or {}).get("student"), dict(d.get("val_loss") or {}),
                   dict(d.get("tasks") or {}), d)


@dataclass
class PipelineSummary:
    rounds: list[RoundRecord] = field(default_factory=list)
    seconds: float | None = None  # this invocation
    seconds_all: float | None = None  # a resumed pipeline: its stages over all invocations
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineSummary":
        num = lambda k: None if d.get(k) is None else float(d[k])  # noqa: E731
        return cls([RoundRecord.from_dict(r) for r in d.get("rounds", []) if "name" in r],
                   num("seconds"), num("seconds_all"), d)


def write_summary(out, summary: dict) -> Path:
    return write_json(Path(out) / SUMMARY, summary, default=str)


def read_summary(out) -> PipelineSummary:
    return PipelineSummary.from_dict(read_json(Path(out) / SUMMARY))


def write_stage_seconds(path, seconds: dict[str, float]) -> Path:
    return write_json(path, seconds)


def read_stage_seconds(path) -> dict[str, float]:
    """Recorded seconds per stage; {} when none yet or damaged (timings are not worth a stop)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return {}

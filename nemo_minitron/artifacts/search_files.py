"""The architecture search's files: ``candidates.json`` (the band and which were selected),
``chosen.json`` (the winner: what the pipeline continues from) and ``diverged.json`` (a
candidate whose distillation diverged, with the train settings it diverged under)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .atomic import read_json, write_json

CANDIDATES, CHOSEN, DIVERGED = "candidates.json", "chosen.json", "diverged.json"


@dataclass
class Chosen:
    index: int
    name: str
    target: dict  # the prune target (num_layers, hidden_size ...)
    params: int
    pruned: str  # checkpoint directories
    distilled: str
    plan: str
    rank_by: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Diverged:
    message: str  # the guard's message: at which step, what to change
    train: dict  # the train settings it diverged under (a rerun with others retries)


def write_candidates(out, info: dict) -> Path:
    return write_json(Path(out) / CANDIDATES, info, default=str)


def write_chosen(out, chosen: Chosen) -> Path:
    return write_json(Path(out) / CHOSEN, chosen.to_dict(), default=str)


def read_chosen(out) -> Chosen:
    d = read_json(Path(out) / CHOSEN)
    return Chosen(**{f.name: d[f.name] for f in dataclasses.fields(Chosen)})


def write_diverged(run_dir, diverged: Diverged) -> Path:
    return write_json(Path(run_dir) / DIVERGED, dataclasses.asdict(diverged), default=str)


def read_diverged(run_dir) -> Diverged:
    d = read_json(Path(run_dir) / DIVERGED)
    return Diverged(d["message"], d.get("train"))

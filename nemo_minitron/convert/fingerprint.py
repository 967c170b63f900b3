"""What a checkpoint is, as a short hash: for the caches that must know whether the model they
were made from is still the one on disk (the offline teacher cache, reused evaluations)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import checkpoint as ckpt


def sha(parts) -> str:
    """sha256 of ``parts`` (bytes, or anything whose ``str`` is hashed) in order."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
    return h.hexdigest()


def checkpoint_fingerprint(path) -> str:
    """sha256 of arch.json, every weight shard's safetensors header (names, dtypes, shapes) and
    16 blocks of 4 KiB spread over each shard's data: cheap for any model size (reading and
    hashing 16 GB of an 8B model would take minutes in every pre-flight) and different for any two
    models that differ beyond a handful of weights (training or pruning changes them all)."""
    p = Path(path)
    parts = [(p / ckpt.ARCH).read_bytes()]
    for name in ckpt.weight_files(p):
        f = p / name
        parts.append(json.dumps(ckpt.safetensors_header(f), sort_keys=True))
        size = f.stat().st_size
        with open(f, "rb") as fh:
            for i in range(16):
                fh.seek(size * i // 16)
                parts.append(fh.read(4096))
    return sha(parts)


def tokenizer_fingerprint(path) -> str | None:
    """sha256 of a checkpoint's tokenizer/tokenizer.json vocabulary and merges, or None."""
    f = Path(path) / ckpt.TOKENIZER / "tokenizer.json"
    if not f.is_file():
        return None
    return sha([json.dumps(json.loads(f.read_text()).get("model"), sort_keys=True)])

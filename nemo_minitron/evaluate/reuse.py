"""Reuse the results of an identical earlier evaluation instead of running it again.

Every pipeline run evaluates its teacher, and the teacher rarely changes between runs: on the
embedded default that is two of the pipeline's twelve minutes, and on an 8B teacher with MMLU it
is GPU-hours. An evaluation's results are kept under ``<cache>/eval_results/<key>.json`` and
reused when the key matches, i.e. when everything that decides the numbers is the same:

- the checkpoint: the fingerprints of its weights and tokenizer (the ones the offline teacher
  cache checks, :mod:`..convert.fingerprint`) and its ``minitron.json``, which carries the time
  it was written, so a re-import or re-save is a new checkpoint;
- the held-out data (:func:`..data.indexed.data_fingerprint`), sequence length, validation
  fraction and the seed that splits them;
- the evaluation settings (batches, tasks, items, few-shot, batch sizes) and the contents of
  JSONL task files;
- the dtype, the parallel layout, and the versions of this package's code (a digest of its
  sources), torch and megatron-core.

A damaged or foreign cache file is ignored (with a warning) and the evaluation runs. Only the
newest :data:`KEEP` results are kept. ``eval.reuse=false`` always evaluates.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Optional

from ..artifacts.atomic import read_json, write_json
from ..config.constants import cache_dir
from ..convert.checkpoint import META
from ..convert.fingerprint import checkpoint_fingerprint, sha, tokenizer_fingerprint
from ..data.indexed import data_fingerprint

log = logging.getLogger(__name__)

FORMAT = "nemo_minitron.eval_results/1"
KEEP = 64
"""Cached results kept (newest first); each is a few kilobytes."""


def store_dir() -> Path:
    return cache_dir() / "eval_results"


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over this package's Python sources: any change of code is a new key."""
    pkg = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(pkg.rglob("*.py")):
        h.update(str(p.relative_to(pkg)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def settings(data, ev, seed: int) -> dict:
    """The settings an evaluation's numbers depend on besides the checkpoint and file contents:
    held-out data and split (``seed`` chooses the held-out documents) and the tasks' settings (not
    batch sizes, dtype or layout). A pipeline keeps them in its results files
    (:meth:`..runs.Steps.evaluate`)."""
    return {"data": [str(data.prefix), data.seq_length, data.valid_fraction, seed],
            "num_batches": ev.num_batches, "tasks": list(ev.tasks), "limit": ev.limit,
            "num_fewshot": ev.num_fewshot, "fewshot_seed": ev.fewshot_seed}


def key(checkpoint, data, ev, dtype: str, layout, seed: int) -> str:
    """The hex key of one evaluation: equal keys mean equal inputs, settings and code."""
    ck = Path(checkpoint)
    what = {
        "format": FORMAT,
        "checkpoint": [str(ck.resolve()), (ck / META).read_text(), checkpoint_fingerprint(ck),
                       tokenizer_fingerprint(ck)],
        "settings": settings(data, ev, seed),
        "contents": [data_fingerprint(data.prefix)]
        + [sha([Path(t[6:]).read_bytes()]) for t in ev.tasks if t.startswith("jsonl:")],
        "batches": [ev.micro_batch_size, ev.task_batch_size],
        "dtype": dtype, "layout": layout,
        "code": [code_digest(), _version("torch"), _version("megatron-core")],
    }
    return sha([json.dumps(what, sort_keys=True, default=str)])


def entry(k: str) -> Path:
    """The file that keeps the results of key ``k``."""
    return store_dir() / f"{k}.json"


def lookup(k: str) -> Optional[dict]:
    """The stored results for key ``k`` (exactly what the evaluation returned: the results
    files of a reused and a fresh evaluation are the same), or None (absent, unreadable, not
    ours)."""
    path = entry(k)
    if not path.is_file():
        return None
    try:
        kept = read_json(path)
        if kept.get("format") != FORMAT or kept.get("key") != k:
            raise ValueError("not an evaluation results entry for this key")
        result = dict(kept["result"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the unreadable cached evaluation %s (%s); evaluating again", path, e)
        return None
    return result


def store(k: str, result: dict) -> Optional[Path]:
    """Keep ``result`` under key ``k`` (whole or absent); drop the oldest beyond :data:`KEEP`.
    A cache that cannot be written costs a warning, never the evaluation."""
    path = entry(k)
    try:
        store_dir().mkdir(parents=True, exist_ok=True)
        write_json(path, {"format": FORMAT, "key": k, "result": result}, default=str)
        entries = sorted(store_dir().glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
        for old in entries[:-KEEP]:
            old.unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not keep the evaluation results in %s (%s)", store_dir(), e)
        return None
    return path

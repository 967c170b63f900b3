"""Tokenise documents into megatron-core's indexed dataset (``<prefix>.bin`` / ``<prefix>.idx``).

:func:`build_indexed` writes one sequence per document (tokens + EOD) with megatron-core's
``IndexedDatasetBuilder``, in the smallest integer dtype that holds the vocabulary, plus a
``<prefix>.json`` describing it (tokenizer, EOD id, counts, sources). Everything is written under
temporary names and renamed at the end, so an interrupted build never leaves a dataset that looks
complete. :func:`open_indexed` reads it back as megatron-core's ``IndexedDataset``, so the files
also work with Megatron-LM's own ``GPTDataset`` (``--data-path <prefix>``).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

from ..artifacts import atomic

BATCH_DOCS = 64  # documents tokenised per tokenizer call (the fast tokenizers batch in Rust)


def smallest_dtype(vocab_size: int) -> type:
    """The smallest integer dtype megatron-core's indexed dataset stores that holds ids < vocab_size."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    for dtype in (np.uint8, np.uint16, np.int32, np.int64):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return dtype
    raise ValueError(f"vocab_size {vocab_size} does not fit in int64")


def _indexed_module():
    """megatron-core's indexed_dataset, imported on use so that reading this module (the data
    schema, the CLI's help) does not pay for megatron-core."""
    with warnings.catch_warnings():  # megatron-core warns about missing TE/apex on import
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def _paths(prefix: Union[str, Path]) -> dict:
    p = str(prefix)
    return {"bin": Path(p + ".bin"), "idx": Path(p + ".idx"), "json": Path(p + ".json")}


def _batched(documents: Iterable[str], n: int) -> Iterable[List[str]]:
    batch: List[str] = []
    for doc in documents:
        if not isinstance(doc, str):
            raise TypeError(f"documents must be strings, got {type(doc).__name__}")
        batch.append(doc)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _end_of_document(tokenizer: Any, eod_id: Optional[int], append_eod: bool) -> Optional[int]:
    if eod_id is None and append_eod:
        eod_id = getattr(tokenizer, "eos_token_id", None)
        if eod_id is None:
            raise ValueError(
                "the tokenizer has no eos_token_id to end documents with; pass eod_id=<token id> "
                "or append_eod=False"
            )
    return eod_id


@dataclass
class _Counts:
    documents: int = 0
    tokens: int = 0
    skipped_empty: int = 0


def _tokenise_into(builder, documents: Iterable[str], tokenizer: Any, *, eod_id: Optional[int],
                   append_eod: bool, dtype: type, desc: str, progress: bool) -> _Counts:
    """Add every non-empty document (plus EOD) to ``builder``; raises on an id ``dtype`` cannot
    hold."""
    vocab_size, dtype_max = len(tokenizer), np.iinfo(dtype).max
    counts = _Counts()
    try:
        total = len(documents)  # type: ignore[arg-type]
    except TypeError:
        total = None
    with tqdm(total=total, unit="doc", desc=desc, disable=not progress) as bar:
        for batch in _batched(documents, BATCH_DOCS):
            ids_batch = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            for ids in ids_batch:
                if not ids:
                    counts.skipped_empty += 1
                    continue
                if append_eod:
                    ids = list(ids) + [eod_id]
                arr = np.asarray(ids, dtype=np.int64)
                if arr.min() < 0 or arr.max() > dtype_max:
                    raise ValueError(
                        f"token id {int(arr.max())} does not fit the dataset dtype "
                        f"{np.dtype(dtype).name} chosen from len(tokenizer)={vocab_size}"
                    )
                builder.add_document(arr.astype(dtype), [arr.size])
                counts.documents += 1
                counts.tokens += int(arr.size)
            bar.update(len(batch))
    return counts


def _metadata(tokenizer: Any, eod_id: Optional[int], append_eod: bool, dtype: type,
              counts: _Counts, sources) -> dict:
    return {
        "format": "megatron-core IndexedDataset (one sequence per document)",
        "tokenizer": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
        "tokenizer_class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "eod_id": eod_id,
        "append_eod": append_eod,
        "dtype": np.dtype(dtype).name,
        "documents": counts.documents,
        "tokens": counts.tokens,
        "skipped_empty": counts.skipped_empty,
        "sources": [str(s) for s in (sources or [])],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _install(tmp: dict, paths: dict) -> None:
    """An old .idx goes first so a crash midway never pairs an old .idx with a new .bin
    (IndexedDataset.exists needs both); the metadata comes last."""
    if paths["idx"].exists():
        paths["idx"].unlink()
    for k in ("bin", "idx", "json"):
        atomic.commit_file(tmp[k], paths[k])


def build_indexed(
    documents: Iterable[str],
    tokenizer: Any,
    out_prefix: Union[str, Path],
    *,
    append_eod: bool = True,
    eod_id: Optional[int] = None,
    sources: Optional[Sequence[Union[str, Path]]] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenise ``documents`` with a Hugging Face ``tokenizer`` into ``<out_prefix>.bin/.idx/.json``.

    Each document becomes one sequence: ``tokenizer(doc, add_special_tokens=False)["input_ids"]``
    followed by ``eod_id`` (default ``tokenizer.eos_token_id``) when ``append_eod``. Documents that
    tokenise to nothing are skipped. ``sources`` is only recorded in the metadata. Refuses to
    replace an existing dataset unless ``overwrite``. Returns the statistics (documents, tokens,
    skipped, dtype, eod_id, paths).
    """
    paths = _paths(out_prefix)
    if not overwrite and (paths["bin"].exists() or paths["idx"].exists()):
        raise FileExistsError(
            f"an indexed dataset already exists at {out_prefix} (.bin/.idx); pass overwrite=True "
            "or choose another out_prefix"
        )
    eod_id = _end_of_document(tokenizer, eod_id, append_eod)
    dtype = smallest_dtype(max(len(tokenizer), (eod_id + 1) if eod_id is not None else 0))

    mod = _indexed_module()
    parent = paths["bin"].parent
    new_dirs = [d for d in (parent, *parent.parents) if not d.exists()]  # removed on failure
    parent.mkdir(parents=True, exist_ok=True)
    tmp = {k: atomic.partial_name(v) for k, v in paths.items()}
    builder = None
    try:
        builder = mod.IndexedDatasetBuilder(str(tmp["bin"]), dtype=dtype)
        counts = _tokenise_into(builder, documents, tokenizer, eod_id=eod_id,
                                append_eod=append_eod, dtype=dtype, progress=progress,
                                desc=f"tokenising -> {Path(out_prefix).name}")
        if counts.documents == 0:
            raise ValueError(
                f"no text to write to {out_prefix}: the inputs hold no non-empty documents "
                f"({counts.skipped_empty} empty ones skipped); check the data sources"
            )
        builder.finalize(str(tmp["idx"]))
        builder = None
        meta = _metadata(tokenizer, eod_id, append_eod, dtype, counts, sources)
        tmp["json"].write_text(json.dumps(meta, indent=2) + "\n")
        _install(tmp, paths)
        new_dirs = []  # complete: the directories stay
    finally:
        if builder is not None:
            builder.data_file.close()
        for p in tmp.values():
            atomic.discard(p)
        for d in new_dirs:  # failed: remove the directories made for it (deepest first)
            with contextlib.suppress(OSError):  # unless something else was put there meanwhile
                d.rmdir()
    return {
        "documents": counts.documents,
        "tokens": counts.tokens,
        "skipped_empty": counts.skipped_empty,
        "dtype": np.dtype(dtype).name,
        "eod_id": eod_id,
        "prefix": str(out_prefix),
    }


def _missing_files(prefix) -> list[str]:
    return [str(p) for k, p in _paths(prefix).items() if k != "json" and not p.exists()]


def data_fingerprint(prefix) -> dict:
    """The dataset as a cache saw it: its absolute prefix, the sha256 of the (small) .idx and
    the size of the .bin (a rebuilt or appended dataset changes one of them)."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    return {"prefix": str(Path(prefix).resolve()),
            "idx_sha256": hashlib.sha256(idx.read_bytes()).hexdigest(),
            "bin_bytes": bin_.stat().st_size}


def open_indexed(prefix: Union[str, Path]):
    """megatron-core ``IndexedDataset`` at ``prefix`` (a clear error when it is not there, and
    the fix when the prefix was given with the .bin or .idx of one of its files)."""
    paths = _paths(prefix)
    missing = _missing_files(prefix)
    stem = str(prefix)[:-4]
    if missing and str(prefix).endswith((".bin", ".idx")) and not _missing_files(stem):
        raise FileNotFoundError(f"no indexed dataset at {prefix}: the prefix names both files "
                                f"without their suffix; use {stem}")
    if missing:
        raise FileNotFoundError(
            f"no indexed dataset at {prefix}: missing {', '.join(missing)}; build one with "
            "`minitron data` (nemo_minitron.data.indexed.build_indexed)"
        )
    if paths["bin"].stat().st_size == 0:  # megatron cannot even map it
        raise ValueError(f"indexed dataset {prefix} is empty ({paths['bin']} has 0 bytes); "
                         "rebuild it with `minitron data` from non-empty inputs")
    try:
        ds = _indexed_module().IndexedDataset(str(prefix), mmap=True)
    except Exception as e:  # megatron asserts on a damaged index: say which file, and the fix
        raise ValueError(f"{paths['idx']} cannot be read ({type(e).__name__}: {e}); rebuild the "
                         "dataset with `minitron data`") from None
    if len(ds) == 0:
        raise ValueError(f"indexed dataset {prefix} is empty (0 documents); rebuild it with "
                         "`minitron data` from non-empty inputs")
    need = int(ds.index.sequence_lengths.astype(np.int64).sum()) * np.dtype(ds.index.dtype).itemsize
    have = paths["bin"].stat().st_size
    if have < need:
        raise ValueError(f"{paths['bin']} is truncated: {have} bytes, its .idx describes {need}; "
                         "copy it again or rebuild the dataset with `minitron data`")
    return ds


def load_metadata(prefix: Union[str, Path]) -> dict:
    """The ``<prefix>.json`` written by :func:`build_indexed` (``{}`` for a foreign dataset)."""
    p = _paths(prefix)["json"]
    return atomic.read_json(p) if p.exists() else {}

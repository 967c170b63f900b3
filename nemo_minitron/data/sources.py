"""Text sources for tokenisation: plain text, JSON lines and Wikipedia dumps, as a stream of documents.

:func:`iter_documents` takes files (or directories, read in sorted order) and yields one string per
document, by suffix (text formats may be compressed: ``.gz``, ``.bz2``, ``.xz`` or ``.zst``, e.g.
``.jsonl.zst``; see :mod:`.compressed`):

- ``.txt``: **one document per file**, because a text file is usually one coherent
  text (a book, an article) and the packed loader holds out whole documents for validation. A file
  larger than ``txt_max_chars`` (a whole corpus in one file) is cut, at blank lines only, into
  consecutive documents of about that size, so that it streams in bounded memory and can still be
  split into train/valid by document. A single paragraph longer than that is never cut.
- ``.jsonl``: one document per non-blank line, the string field ``json_key``.
- ``.json``: JSON lines as well (what most corpora mean by ``.json``, e.g. Dolma's ``.json.gz``),
  or one JSON array of such objects or of strings (read whole into memory).
- ``.xml`` and a bare ``.bz2``: a MediaWiki dump; each article becomes ``"Title\\n\\ntext"``
  (see :mod:`nemo_minitron.data.wiki`).
- ``.parquet`` and ``.arrow``: the formats Hugging Face datasets ship in (hub parquet files,
  ``save_to_disk`` directories of Arrow IPC streams, ``datasets`` cache files): one document per
  row, the string column ``json_key``, read in record batches (bounded memory) with pyarrow.

Documents that are empty or whitespace-only are skipped.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path
from typing import Iterable, Iterator, List, Union

from nemo_minitron.data.compressed import COMPRESSIONS, DAMAGED, open_text, split_suffix
from nemo_minitron.data.wiki import iter_articles

# pyarrow is imported where parquet/arrow inputs are read: optional and heavy; text and JSONL
# inputs do not need it.

PathLike = Union[str, Path]
_TEXT_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".xml": "wiki"}
_TABLE_KINDS = {".parquet": "parquet", ".arrow": "arrow"}
SUFFIXES = (tuple(t + c for t in _TEXT_KINDS for c in ("",) + COMPRESSIONS)
            + (".bz2",) + tuple(_TABLE_KINDS))


def _kind(path: Path) -> str:
    inner, comp = split_suffix(path)
    for suffix, kind in _TEXT_KINDS.items():
        if inner.endswith(suffix):
            return kind
    if not comp:
        for suffix, kind in _TABLE_KINDS.items():
            if inner.endswith(suffix):
                return kind
    if comp == ".bz2":  # a Wikipedia dump named without .xml
        return "wiki"
    raise ValueError(
        f"don't know how to read {path}: supported are .txt, .jsonl, .json and .xml (each also "
        f"compressed: {', '.join(COMPRESSIONS)}), .parquet and .arrow "
        "(rename the file or convert it to .jsonl with one {\"text\": ...} object per line)"
    )


# JSON files a directory of data holds beside the data: Hugging Face datasets' save_to_disk
# metadata, and the statistics our indexed datasets are written with (<prefix>.json)
_METADATA = ("dataset_info.json", "state.json", "dataset_dict.json")


def _metadata(path: Path) -> bool:
    return path.name in _METADATA or (path.suffix == ".json" and path.with_suffix(".idx").exists())


def expand_paths(paths: Union[PathLike, Iterable[PathLike]]) -> List[Path]:
    """Files named by ``paths``; a directory stands for its supported files, sorted, recursively."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and f.name.lower().endswith(SUFFIXES) and not _metadata(f)
            )
            if not found:
                raise ValueError(f"directory {p} holds no file ending in {', '.join(SUFFIXES)}")
            out.extend(found)
        elif p.exists():
            _kind(p)  # fail early on an unsupported suffix
            out.append(p)
        else:
            raise FileNotFoundError(f"data source {p} does not exist")
    if not out:
        raise ValueError("no data sources given")
    return out


def _iter_txt(path: Path, max_chars: int) -> Iterator[str]:
    buf: List[str] = []
    size = 0
    with open_text(path) as f:
        for line in f:
            if not line.strip() and size >= max_chars:
                yield "".join(buf).strip("\n")
                buf, size = [], 0
                continue
            buf.append(line)
            size += len(line)
    if buf:
        yield "".join(buf).strip("\n")


def _iter_jsonl(path: Path, json_key: str) -> Iterator[str]:
    with open_text(path) as f:
        yield from _json_lines(path, json_key, f)


def _json_lines(path: Path, json_key: str, lines: Iterable[str]) -> Iterator[str]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg}); a JSON lines "
                             "source holds one object per line") from None
        yield _text_of(obj, json_key, f"{path}, line {lineno}")


def _text_of(obj, json_key: str, where: str) -> str:
    if not isinstance(obj, dict) or json_key not in obj:
        keys = ", ".join(map(repr, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{where}: no field {json_key!r} (found: {keys}); "
                         f"pass json_key=<the field holding the text>")
    text = obj[json_key]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {json_key!r} is a {type(text).__name__}, "
                         "expected a string")
    return text


def _iter_json(path: Path, json_key: str) -> Iterator[str]:
    """JSON lines, or one JSON array (of objects with ``json_key``, or of strings)."""
    with open_text(path) as f:
        head = f.read(4096)
        first = head.lstrip()[:1]
        if first != "[":  # JSON lines: the lines read so far, then the rest of the file
            yield from _json_lines(path, json_key,
                                   itertools.chain(io.StringIO(head + f.readline()), f))
            return
        try:
            rows = json.loads(head + f.read())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); a .json source "
                             "is JSON lines or one JSON array") from None
    for i, row in enumerate(rows):
        yield row if isinstance(row, str) else _text_of(row, json_key, f"{path}, item {i}")


def _arrow_batches(path: Path, columns=None):
    """Record batches of an Arrow IPC file: the stream format (``datasets``' own) or the
    random-access file format; ``columns`` only, for parquet."""
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    if _kind(path) == "parquet":
        yield from pq.ParquetFile(path).iter_batches(columns=columns, batch_size=1024)
        return
    with pa.memory_map(str(path)) as src:
        try:
            reader = ipc.open_stream(src)
        except pa.ArrowInvalid:
            src.seek(0)
            f = ipc.open_file(src)
            reader = (f.get_batch(i) for i in range(f.num_record_batches))
        yield from reader


def _schema(path: Path):
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    if _kind(path) == "parquet":
        return pq.read_schema(path)
    with pa.memory_map(str(path)) as src:
        try:
            return ipc.open_stream(src).schema
        except pa.ArrowInvalid:
            src.seek(0)
            return ipc.open_file(src).schema


def check_columns(paths: Union[PathLike, Iterable[PathLike]], column: str) -> None:
    """Fail before any tokenising when a parquet/arrow source lacks the text column ``column``
    or holds something other than strings there (reads only the files' schemas)."""
    import pyarrow.types as pat

    for path in expand_paths(paths):
        if _kind(path) not in ("parquet", "arrow"):
            continue
        try:
            schema = _schema(path)
        except (ValueError, OSError) as e:  # pyarrow's errors name neither the file nor the fix
            raise ValueError(f"{path} cannot be read as {_kind(path)} ({str(e).strip()}); "
                             "check the file, or give it the suffix of its format") from None
        if column not in schema.names:
            raise ValueError(f"{path}: no column {column!r} (found: {', '.join(schema.names)}); "
                             f"pass json_key=<the column holding the text>")
        t = schema.field(column).type
        if not (pat.is_string(t) or pat.is_large_string(t)):
            raise ValueError(f"{path}: column {column!r} holds {t}, not text; pass "
                             "json_key=<the column holding the text>")


def _iter_table(path: Path, column: str) -> Iterator[str]:
    check_columns([path], column)
    for batch in _arrow_batches(path, columns=[column]):
        for text in batch.column(batch.schema.get_field_index(column)).to_pylist():
            if text is not None:
                yield text


def iter_documents(
    paths: Union[PathLike, Iterable[PathLike]],
    json_key: str = "text",
    *,
    txt_max_chars: int = 1_000_000,
) -> Iterator[str]:
    """Yield the documents of ``paths`` (files or directories) in order; see the module docstring."""
    if txt_max_chars < 1:
        raise ValueError(f"txt_max_chars must be positive, got {txt_max_chars}")
    for path in expand_paths(paths):
        kind = _kind(path)
        if kind == "txt":
            docs: Iterable[str] = _iter_txt(path, txt_max_chars)
        elif kind == "jsonl":
            docs = _iter_jsonl(path, json_key)
        elif kind == "json":
            docs = _iter_json(path, json_key)
        elif kind in ("parquet", "arrow"):
            docs = _iter_table(path, json_key)
        else:
            docs = (f"{title}\n\n{text}" for title, text in iter_articles(path))
        yield from _non_empty(docs, path)


def _non_empty(docs: Iterable[str], path: Path) -> Iterator[str]:
    """The non-empty documents of one file; a byte that is not UTF-8, or a damaged archive, names
    the file (the bare codec or gzip error names neither it nor the fix)."""
    try:
        for doc in docs:
            if doc.strip():
                yield doc
    except UnicodeDecodeError as e:
        head = bytes(e.object[:2])
        source = "utf-16" if head in (b"\xff\xfe", b"\xfe\xff") else "latin1"  # UTF-16's mark
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x}); convert it, "
                         f"e.g. `iconv -f {source} -t utf-8 {path} > "
                         f"{path.stem}.utf8{path.suffix}`") from None
    except DAMAGED as e:  # a damaged or cut archive
        raise ValueError(f"{path} cannot be read ({e}); is it damaged or cut short? Recreate or "
                         "re-download it") from None

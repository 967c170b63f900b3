"""The one way a run puts a file or a directory on disk: whole or not at all.

Everything is built under a temporary sibling name ``.<name>.partial-<id>`` and renamed into place
when complete, so a reader (or a resumed job) sees the old version or the whole new one, never a
half-written file; a process killed mid-write leaves only a partial name, which :func:`partials`
finds and :func:`remove_partials` clears. The ids are unique, so concurrent writers (the jobs of a
search multirun) never share a temporary name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

PARTIAL = ".partial-"


def partial_name(final) -> Path:
    """A unique temporary name beside ``final``."""
    final = Path(final)
    return final.parent / f".{final.name}{PARTIAL}{uuid.uuid4().hex[:8]}"


def partials(root, recursive: bool = False) -> list[Path]:
    """Temporary files and directories of writes that never committed under ``root``."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = root.rglob(f".*{PARTIAL}*") if recursive else root.glob(f".*{PARTIAL}*")
    return sorted(p for p in found if PARTIAL not in str(p.parent))


def discard(p) -> None:
    """Remove a temporary file or directory if it is there (a link is removed, not followed)."""
    p = Path(p)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)


def remove_partials(found: list[Path]) -> None:
    for p in found:
        discard(p)


# ----------------------------------------------------------------------------------------------
# files


def commit_file(tmp, final) -> Path:
    """Flush ``tmp`` to disk, then rename it over ``final``: after a crash the file is the old
    one or the complete new one (a rename before the data is on disk could leave it empty)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    return Path(final)


def write_file(path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` to a temporary sibling of ``path``, then :func:`commit_file`. When ``write``
    raises, ``path`` keeps its old content and the temporary file is removed."""
    path = Path(path)
    tmp = partial_name(path)
    try:
        write(tmp)
        commit_file(tmp, path)
    finally:
        discard(tmp)
    return path


def write_text(path, text: str) -> Path:
    return write_file(path, lambda tmp: tmp.write_text(text))


def write_json(path, obj, *, indent: int | None = 2, newline: bool = False,
               default=None) -> Path:
    """``obj`` as JSON (the layout each artifact has always had: ``indent``, a final newline or
    not, ``default=str`` for paths and dates where a writer relied on it)."""
    return write_text(path, json.dumps(obj, indent=indent, default=default) + ("\n" if newline else ""))


def read_json(path) -> dict:
    """A JSON object, or a one-line ``ValueError`` naming the file (a damaged copy is common)."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


# ----------------------------------------------------------------------------------------------
# directories


def check_new_dir(path, overwrite: bool = False) -> Path:
    """Refuse to replace a non-empty ``path`` unless ``overwrite`` (checked before slow work)."""
    final = Path(path)
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise FileExistsError(f"output {final} already exists and is not empty; choose another "
                              "output directory or pass overwrite=true to replace it")
    return final


def check_output_place(output, kind: str = "dir", file_name: str = "eval_results.json") -> None:
    """``output`` can be created: nothing of the wrong kind stands where it or a parent directory
    would go (else the stage fails with a bare errno after its work, the model loaded). ``kind``:
    dir (created whole), file (``file_name`` is the example the message gives) or prefix (of
    files written beside it: only the parents must be directories)."""
    path = Path(output).expanduser()
    if kind != "dir" and str(output).endswith(("/", os.sep)):  # Path() drops the slash
        example = path / (file_name if kind == "file" else "corpus")
        raise IsADirectoryError(f"output={output} ends in '/', but names the "
                                f"{'file to write' if kind == 'file' else 'prefix of the files'}"
                                f"; e.g. output={example}")
    if kind == "dir" and path.is_file():
        raise NotADirectoryError(f"output={output} is a file; give a directory to create")
    if kind == "file" and path.is_dir():
        raise IsADirectoryError(f"output={output} is a directory; give the file to write, "
                                f"e.g. output={Path(output) / file_name}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"output={output}: {parent} is a file, not a directory; "
                                         "choose another output")
            return


def begin_dir(path, overwrite: bool = False) -> tuple[Path, Path]:
    """(final, temporary) of a new directory, the temporary one created. Collective saves, whose
    ranks all write into it, use this with :func:`commit_dir`; one process uses :func:`new_dir`."""
    final = check_new_dir(path, overwrite)
    tmp = partial_name(final)
    tmp.mkdir(parents=True)
    return final, tmp


def commit_dir(tmp, final) -> Path:
    """Rename the complete ``tmp`` to ``final``. A directory already there is moved aside first
    and removed after, so ``final`` is never a mix of old and new files."""
    tmp, final = Path(tmp), Path(final)
    old = partial_name(final) if final.exists() else None
    if old is not None:
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        discard(old)
    return final


@contextlib.contextmanager
def new_dir(path, overwrite: bool = False) -> Iterator[Path]:
    """``with new_dir(out) as tmp:`` fill ``tmp``; it becomes ``out`` when the block ends, and is
    removed (``out`` untouched) when the block raises."""
    final, tmp = begin_dir(path, overwrite)
    try:
        yield tmp
        commit_dir(tmp, final)
    finally:
        discard(tmp)

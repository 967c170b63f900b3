"""Opening text sources that may be compressed: gzip, bzip2, xz or zstandard, by suffix.

Corpora ship compressed: Wikipedia dumps as ``.bz2``, Dolma as ``.json.gz``, SlimPajama and The
Pile as ``.jsonl.zst``. :func:`split_suffix` tells a file's format from its compression,
:func:`open_binary` and :func:`open_text` decompress while reading (bounded memory), and
:data:`DAMAGED` lists the errors a cut or corrupt archive raises, so callers can name the file.
zstandard is read with the ``zstandard`` package, frame after frame (``pzstd`` writes several); a
file that ends inside a frame raises EOFError (zstandard's own stream reader returns what it has).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
from pathlib import Path

COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def _zstd_errors() -> tuple:
    try:
        import zstandard
    except ImportError:
        return ()
    return (zstandard.ZstdError,)


# what reading a truncated or corrupt archive raises (BadGzipFile is an OSError)
DAMAGED = (EOFError, OSError, lzma.LZMAError) + _zstd_errors()


def split_suffix(path: Path) -> tuple[str, str]:
    """``(name without its compression suffix, compression suffix or "")``, lower-cased."""
    name = path.name.lower()
    for c in COMPRESSIONS:
        if name.endswith(c):
            return name[: -len(c)], c
    return name, ""


def check_readable(path: Path):
    """Raises naming the fix when ``path``'s compression needs a package that is missing; returns
    that package's module (or None)."""
    if split_suffix(path)[1] != ".zst":
        return None
    try:
        import zstandard
    except ImportError:
        raise ValueError(f"{path} is zstandard-compressed and the zstandard package is not "
                         f"installed: pip install zstandard (or decompress it: zstd -d {path})"
                         ) from None
    return zstandard


def open_binary(path: Path):
    """``path`` opened for reading bytes, decompressed by its suffix."""
    _, comp = split_suffix(path)
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp == ".bz2":
        return bz2.open(path, "rb")
    if comp == ".xz":
        return lzma.open(path, "rb")
    if comp == ".zst":
        return io.BufferedReader(_ZstdFrames(check_readable(path), open(path, "rb")))
    return open(path, "rb")


def open_text(path: Path):
    """``path`` opened for reading UTF-8 text, decompressed by its suffix."""
    if not split_suffix(path)[1]:
        return open(path, "r", encoding="utf-8")
    return io.TextIOWrapper(open_binary(path), encoding="utf-8")


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every zstandard frame in ``raw``, one after another."""

    def __init__(self, zstandard, raw):
        self._zstd, self._raw, self._buf, self._pos = zstandard, raw, b"", 0
        self._obj, self._inside = zstandard.ZstdDecompressor().decompressobj(), False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._pos == len(self._buf):
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if self._inside:
                    raise EOFError("compressed file ended before the end-of-stream marker")
                return 0
            self._buf, self._pos = self._feed(chunk), 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos:self._pos + n]
        self._pos += n
        return n

    def _feed(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            self._inside = True
            out.append(self._obj.decompress(chunk))
            if not self._obj.eof:
                break
            chunk, self._inside = self._obj.unused_data, False  # the next frame starts here
            self._obj = self._zstd.ZstdDecompressor().decompressobj()
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()

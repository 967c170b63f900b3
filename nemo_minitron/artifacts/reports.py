"""Human-readable outputs: Markdown reports and PNG plots, written like every other artifact
(a process killed while writing leaves the old file or none, never a truncated one)."""

from __future__ import annotations

from pathlib import Path

from .atomic import write_file, write_text


def write_markdown(path, lines: list[str], *, final_newline: bool = True) -> Path:
    return write_text(path, "\n".join(lines) + ("\n" if final_newline else ""))


def write_png(path, fig, dpi: int = 110) -> Path:
    """A matplotlib figure as a PNG."""
    return write_file(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))

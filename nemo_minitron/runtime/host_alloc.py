"""Keep freed host memory for reuse instead of handing it back to the kernel.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves every block above its
mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on free, so each large
temporary of a CPU step (a [256, 49152] fp32 chunk of the distillation loss is 48 MiB; the
activations and gradients of a step are a few MiB each, above the threshold's 128 KiB start)
arrives as untouched pages: the kernel faults and zeroes every 4 KiB page on first write. On a
2-core machine that was about half of a bf16 distillation step's CPU time (``aten::copy_`` and
``aten::mm`` writing their outputs) and 14% of the main job's CPU time as system time.

:func:`keep_freed_memory` switches glibc to serve all blocks from its heap (``M_MMAP_MAX=0``) and
trim it only when 2 GiB lie free at its top (``M_TRIM_THRESHOLD``), so a step reuses the pages the
previous one freed, as the CUDA caching allocator does on GPUs. Peak memory stays that of the
largest step; memory is returned when the process ends. Left alone: machines with a GPU (the steps'
temporaries live on the device; host memory mostly carries weights on their way there, better
handed back), other C libraries, an allocator preloaded with ``LD_PRELOAD`` (jemalloc, tcmalloc), a
user's own ``MALLOC_*`` or ``GLIBC_TUNABLES`` settings, and ``NEMO_MINITRON_MALLOC=default``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
_TRIM_ABOVE = 2**31 - 1  # the largest value mallopt takes: trim only past 2 GiB of free top

_done: str | None = None


def _why_not() -> str | None:
    if not sys.platform.startswith("linux"):
        return "not Linux"
    choice = os.environ.get("NEMO_MINITRON_MALLOC", "keep")
    if choice not in ("keep", "default"):
        raise ValueError(f"NEMO_MINITRON_MALLOC={choice!r}: use keep (freed memory reused, the "
                         "default) or default (glibc's own behaviour)")
    if choice == "default":
        return "NEMO_MINITRON_MALLOC=default"
    if any(k.startswith("MALLOC_") for k in os.environ) or "GLIBC_TUNABLES" in os.environ:
        return "the environment sets malloc's own options"
    if os.environ.get("LD_PRELOAD", ""):
        return "another allocator is preloaded (LD_PRELOAD)"
    import torch

    if torch.cuda.is_available():  # the steps run on the GPU; host memory mostly holds weights
        return "a GPU runs the steps"  # on their way there, better handed back once they are
    return None


def keep_freed_memory() -> str:
    """Apply the settings above once per process; returns what was done, in words (for logs).
    ``ValueError`` (one line) for a ``NEMO_MINITRON_MALLOC`` other than keep or default."""
    global _done
    if _done is not None:
        return _done
    why = _why_not()
    if why is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if not hasattr(libc, "gnu_get_libc_version"):
                why = "the C library is not glibc"
            elif not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, _TRIM_ABOVE)):
                why = "mallopt refused"
        except OSError as e:
            why = f"no C library to configure ({e})"
    _done = "kept for reuse" if why is None else f"left as it is: {why}"
    return _done

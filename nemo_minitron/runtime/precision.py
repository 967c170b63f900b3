"""Which compute dtype ``model.dtype=auto`` means here (the names themselves, and the table to
torch dtypes, are :mod:`nemo_minitron.dtypes`; re-exported for the runtime's users).

bf16 (bf16 weights, fp32 main weights and gradients in megatron's optimizer, fp32 losses) is the
default wherever the hardware multiplies bf16 natively: GPUs that support it, and CPUs with AMX
or AVX512-BF16 (oneDNN then runs bf16 matmuls at 2-5x the fp32 rate). Elsewhere bf16 is
emulated and slower than fp32, so ``auto`` means fp32 there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..dtypes import DTYPES, torch_dtype  # noqa: F401


# /proc/cpuinfo flags of native bf16 matmul units (Intel AMX, Intel/AMD AVX512-BF16)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (the first ``flags`` line of /proc/cpuinfo; empty elsewhere)."""
    if cpuinfo is None:
        p = Path("/proc/cpuinfo")
        cpuinfo = p.read_text() if p.is_file() else ""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    flags = cpu_flags(cpuinfo)
    if flags:
        return any(f in flags for f in BF16_CPU_FLAGS)
    # no /proc/cpuinfo (not Linux): ask torch's own CPU probe
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def auto_choice(cuda: bool | None = None, cpuinfo: str | None = None) -> tuple[str, str]:
    """``(dtype, why)``: ``bf16`` where bf16 matmuls are native (see the module docstring), else
    ``fp32``, and the reason in words a user can act on."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        if torch.cuda.is_bf16_supported():
            return "bf16", "the GPU multiplies bf16 natively"
        return "fp32", "the GPU has no native bf16"
    if cpu_has_fast_bf16(cpuinfo):
        return "bf16", "this CPU multiplies bf16 natively (AMX or AVX512-BF16)"
    return "fp32", ("this CPU has no bf16 matmul units (AMX, AVX512-BF16), where bf16 is emulated "
                    "and slower than fp32; expect about twice the time of a CPU that has them")


def auto_dtype(cuda: bool | None = None, cpuinfo: str | None = None) -> str:
    """What ``model.dtype=auto`` means here (:func:`auto_choice`)."""
    return auto_choice(cuda, cpuinfo)[0]


def auto_reason(cuda: bool | None = None, cpuinfo: str | None = None) -> str:
    """Why :func:`auto_dtype` chose what it did (:func:`auto_choice`)."""
    return auto_choice(cuda, cpuinfo)[1]


def resolve(dtype: str) -> str:
    """``auto`` -> :func:`auto_dtype`; an explicit dtype is kept."""
    return auto_dtype() if dtype == "auto" else dtype

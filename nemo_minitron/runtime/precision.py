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


def auto_dtype(cuda: bool | None = None, cpuinfo: str | None = None) -> str:
    """``bf16`` where bf16 matmuls are native (see the module docstring), else ``fp32``."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16(cpuinfo) else "fp32"


def auto_reason(cuda: bool | None = None, cpuinfo: str | None = None) -> str:
    """Why :func:`auto_dtype` chose what it did, in words a user can act on."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        return ("the GPU multiplies bf16 natively" if torch.cuda.is_bf16_supported()
                else "the GPU has no native bf16")
    if cpu_has_fast_bf16(cpuinfo):
        return "this CPU multiplies bf16 natively (AMX or AVX512-BF16)"
    return ("this CPU has no bf16 matmul units (AMX, AVX512-BF16), where bf16 is emulated and "
            "slower than fp32; expect about twice the time of a CPU that has them")


def resolve(dtype: str) -> str:
    """``auto`` -> :func:`auto_dtype`; an explicit dtype is kept."""
    return auto_dtype() if dtype == "auto" else dtype

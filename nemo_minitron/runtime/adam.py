"""Adam through PyTorch's fused kernel when megatron-core falls back to ``torch.optim``.

Without Transformer Engine or Apex (every CPU run), megatron-core's optimizer wraps a plain
``torch.optim.Adam``/``AdamW``, and PyTorch then runs its per-tensor loop on CPU: about ten
elementwise passes over every parameter and its two moments (``lerp_``, ``mul_``, ``addcmul_``,
``sqrt``, ``div``, ``addcdiv_``, ...), ~20% of a bf16 distillation step of the pruned SmolLM2
student on two cores. PyTorch's fused Adam does the same update in one pass per tensor, on CPU as
on GPUs. The update is the same formula; it differs from the loop only in rounding (fp32 round-off
per step). Nothing changes where megatron-core uses TE's or Apex's fused Adam.
"""

from __future__ import annotations

import torch


def _inner_optimizers(opt):
    """The torch optimizers inside megatron-core's wrapper (chained or not)."""
    for o in getattr(opt, "chained_optimizers", None) or [opt]:
        inner = getattr(o, "optimizer", None)
        if inner is not None:
            yield inner


def _fusable(inner: torch.optim.Optimizer) -> bool:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return isinstance(inner, torch.optim.Adam) and all(
        p.device.type in devices and p.is_floating_point()
        for g in inner.param_groups for p in g["params"])


def use_fused_adam(opt) -> int:
    """Switch every plain torch Adam/AdamW inside ``opt`` (a megatron-core optimizer) to the fused
    kernel; returns how many were switched. Call it again after loading an optimizer state: a
    state dict carries its own ``fused`` flag in its parameter groups."""
    n = 0
    for inner in _inner_optimizers(opt):
        if _fusable(inner):
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False
            n += 1
    return n

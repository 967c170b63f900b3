"""The dtype names of this toolkit: :data:`DTYPES` is the one table from our names (fp32, bf16,
fp16: what configs and files say) to torch dtypes; :func:`torch_dtype` also takes torch's own
names (float32, bfloat16...).

A foundation module (it imports only torch), so the converters and the runtime share it; which
dtype ``model.dtype=auto`` means on this machine is the runtime's question
(:mod:`nemo_minitron.runtime.precision`).
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TORCH_NAMES = {str(t).removeprefix("torch."): t for t in DTYPES.values()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``name``: ours (bf16) or torch's (bfloat16)."""
    try:
        return DTYPES.get(name) or _TORCH_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted({*DTYPES, *_TORCH_NAMES})}") from None

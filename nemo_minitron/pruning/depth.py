"""Depth importance by LM loss: the validation loss with each contiguous block of ``n`` layers
removed, for every start position (Minitron, arXiv 2407.14679 Fig. 5).

Layers are skipped at forward time (megatron's ``decoder.layers`` is swapped for the kept
subset on each pipeline stage, then restored), so no model is rebuilt per candidate.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Sequence

import torch

from ..evaluate.loss import validation_loss


@contextmanager
def skipping(stage, drop: Iterable[int]):
    """Forward passes inside the block skip the global layers in ``drop`` held by ``stage``."""
    drop = set(drop)
    decoder = stage.model.decoder
    full = decoder.layers
    decoder.layers = torch.nn.ModuleList(
        [m for g, m in zip(stage.layers, full) if g not in drop])
    try:
        yield
    finally:
        decoder.layers = full


def block_removal_losses(stage, batches: Sequence[dict], n: int, progress: bool = True) -> list[float]:
    """Loss with layers [s, s+n) removed, for s = 0 .. L-n (collective: every rank calls)."""
    L = stage.arch.num_layers
    if not 0 < n < L:
        raise ValueError(f"block size {n} must be in [1, {L - 1}]")
    batches = list(batches)
    losses = []
    starts = range(L - n + 1)
    if progress and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"depth: remove {n} layers", unit="block")
    for s in starts:
        with skipping(stage, range(s, s + n)):
            losses.append(validation_loss(stage, batches)["loss"])
    return losses


def best_block(losses: Sequence[float], n: int, num_layers: int) -> list[int]:
    """Layers to keep when removing the block whose removal costs least loss."""
    start = min(range(len(losses)), key=lambda s: (losses[s], s))
    return [i for i in range(num_layers) if not start <= i < start + n]

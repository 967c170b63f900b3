"""Depth importance by LM loss or downstream accuracy: the validation loss (Minitron, arXiv
2407.14679 Fig. 5) or a multiple-choice accuracy (Fig. 6; 2408.11796 picks the block by
Winogrande) with each contiguous block of ``n`` layers removed, for every start position.

Layers are skipped at forward time (megatron's ``decoder.layers`` is swapped for the kept
subset on each pipeline stage, then restored), so no model is rebuilt per candidate.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Sequence

import torch

from ..evaluate.loss import validation_loss
from ..evaluate.multiple_choice import accuracy, score_items
from ..runtime.parallel import Parallel, current


@contextmanager
def skipping(shard, drop: Iterable[int]):
    """Forward passes inside the block skip the global layers in ``drop`` held by ``shard``."""
    drop = set(drop)
    decoder = shard.model.decoder
    full = decoder.layers
    decoder.layers = torch.nn.ModuleList(
        [m for g, m in zip(shard.layers, full) if g not in drop])
    try:
        yield
    finally:
        decoder.layers = full


def block_removal_losses(shard, batches: Sequence[dict], n: int, progress: bool = True,
                         par: Parallel | None = None) -> list[float]:
    """Loss with layers [s, s+n) removed, for s = 0 .. L-n (collective: every rank calls; ``par``
    shows the progress bar on rank 0, default: the live layout)."""
    L = shard.arch.num_layers
    if not 0 < n < L:
        raise ValueError(f"block size {n} must be in [1, {L - 1}]")
    batches = list(batches)
    losses = []
    starts = (par or current()).progress(range(L - n + 1), desc=f"depth: remove {n} layers",
                                         unit="block", disable=not progress)
    for s in starts:
        with skipping(shard, range(s, s + n)):
            losses.append(validation_loss(shard, batches)["loss"])
    return losses


def block_removal_accuracy(shard, tokenizer, items, n: int, *, micro_batch_size: int = 8,
                           progress: bool = True, par: Parallel | None = None) -> list[float]:
    """Multiple-choice accuracy (acc_norm) with layers [s, s+n) removed, for s = 0 .. L-n."""
    L = shard.arch.num_layers
    if not 0 < n < L:
        raise ValueError(f"block size {n} must be in [1, {L - 1}]")
    par = par or current()
    starts = par.progress(range(L - n + 1), desc=f"depth: remove {n} layers (accuracy)",
                          unit="block", disable=not progress)
    accs = []
    for s in starts:
        with skipping(shard, range(s, s + n)):
            scores = score_items(shard, tokenizer, items, micro_batch_size=micro_batch_size,
                                 progress=False, par=par)
        accs.append(accuracy(items, scores)["acc_norm"])
    return accs


def best_block(losses: Sequence[float], n: int, num_layers: int) -> list[int]:
    """Layers to keep when removing the block whose removal costs least loss."""
    start = min(range(len(losses)), key=lambda s: (losses[s], s))
    return [i for i in range(num_layers) if not start <= i < start + n]

"""Validation loss and perplexity of a model shard over packed held-out batches, at any layout."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from ..runtime.forward import on_device, run_forward, sum_from_last_stage, token_losses


def validation_loss(shard, batches: Iterable[dict], progress: str | None = None) -> dict:
    """Token-weighted mean cross entropy over ``batches``; every rank gets the same numbers.

    Each data-parallel rank passes its own batches; results are summed over DP replicas.
    """
    vocab = shard.arch.vocab_size

    def on_logits(logits, batch):
        mask = batch["loss_mask"].float()
        losses = token_losses(logits, batch["labels"], vocab)
        return {"loss_sum": (losses * mask).sum().double(), "tokens": mask.sum().double()}

    outs = run_forward(shard, (on_device(b) for b in batches), on_logits, progress=progress)
    def fill(total):
        for o in outs:
            total += torch.stack([o["loss_sum"].cpu(), o["tokens"].cpu()])

    loss_sum, tokens = sum_from_last_stage(fill, 2).tolist()
    if tokens == 0:
        raise ValueError("validation saw no tokens; give more data or fewer batches")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": int(tokens)}


def perplexity(loss: float) -> float:
    """exp(loss); past exp(709) a float overflows: inf, never a capped number."""
    return math.exp(loss) if loss < 709 else math.inf

"""Validation loss and perplexity of a model stage over packed held-out batches, at any layout."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as tdist

from ..runtime.forward import on_device, run_forward, token_losses


def validation_loss(stage, batches: Iterable[dict], progress: str | None = None) -> dict:
    """Token-weighted mean cross entropy over ``batches``; every rank gets the same numbers.

    Each data-parallel rank passes its own batches; results are summed over DP replicas.
    """
    from megatron.core import parallel_state as ps

    vocab = stage.arch.vocab_size

    def on_logits(logits, batch):
        mask = batch["loss_mask"].float()
        losses = token_losses(logits, batch["labels"], vocab)
        return {"loss_sum": (losses * mask).sum().double(), "tokens": mask.sum().double()}

    outs = run_forward(stage, (on_device(b) for b in batches), on_logits, progress=progress)
    total = torch.zeros(2, dtype=torch.float64)
    contributes = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    if contributes:
        for o in outs:
            total += torch.stack([o["loss_sum"].cpu(), o["tokens"].cpu()])
    if tdist.is_initialized():
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        t = total.to(dev) if dev else total
        tdist.all_reduce(t)
        total = t.cpu()
    loss_sum, tokens = total.tolist()
    if tokens == 0:
        raise ValueError("validation saw no tokens; give more data or fewer batches")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(tokens)}

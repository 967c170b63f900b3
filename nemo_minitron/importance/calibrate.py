"""The calibration pass: forward-only over calibration batches with every statistics hook on.

The pruner only sees a ``forward_loop(model)`` callable, so any data source works;
:func:`batches_forward_loop` builds one from packed micro-batches.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..runtime.forward import on_device, run_forward
from ..runtime.parallel import Parallel
from .hooks import collecting
from .reduce import Importance, reduce_stats


def batches_forward_loop(shard, batches: Iterable[dict], progress: str | None = "calibrate"):
    batches = list(batches)

    def loop(_model) -> None:
        run_forward(shard, (on_device(b) for b in batches), lambda _logits, _b: {},
                    progress=progress)

    return loop


def calibrate(shard, forward_loop: Callable[[torch.nn.Module], None], *, seq_agg: str = "mean_abs",
              batch_agg: str = "l2", expert_score: str = "contribution",
              par: Parallel | None = None) -> Importance:
    """Run ``forward_loop`` with hooks on; return global importance (same on every rank).
    ``expert_score``: how MoE experts are ranked (:func:`~.scores.expert_scores`); ``par``: the
    layout to reduce over (default: the live one)."""
    with torch.no_grad(), collecting(shard, seq_agg) as stats:
        forward_loop(shard.model)
    return reduce_stats(stats, shard, batch_agg, expert_score, par)

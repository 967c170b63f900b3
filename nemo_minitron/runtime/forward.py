"""Forward passes through megatron-core's pipeline schedules (forward only), and the token loss.

Every rank calls :func:`run_forward` with the same micro-batches; the last pipeline stage sees the
logits (vocab-sharded under TP) and hands them to ``on_logits``. Loss is computed vocab-parallel,
never gathering the full vocabulary, with padded vocabulary columns masked out.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from . import collectives
from .dist import is_rank0

# megatron-core is imported inside the functions that use it: importing it takes seconds, and this
# module is imported (by the stages, preflight, the tests) long before a model is built.


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set logits of padding vocabulary rows (global id >= vocab_size) of this TP shard to -inf."""
    from megatron.core import parallel_state as ps

    local = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * local
    if start + local <= vocab_size:
        return logits
    ids = torch.arange(start, start + local, device=logits.device)
    return logits.masked_fill(ids >= vocab_size, float("-inf"))


def token_losses(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token cross entropy [b, s] from vocab-parallel logits [b, s, V/tp]."""
    from megatron.core import tensor_parallel

    logits = mask_padded_vocab(logits.float(), vocab_size)
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)


def gather_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits (for tests and small models): all-gather over TP, drop padding."""
    from megatron.core import tensor_parallel

    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return full[..., :vocab_size]


def run_forward(shard, batches: Iterable[dict], on_logits: Callable[[torch.Tensor, dict], dict],
                progress: str | None = None) -> list[dict]:
    """Forward every micro-batch through the pipeline; returns ``on_logits``' dicts (last stage).

    ``progress``: a label for a progress bar over micro-batches (shown on global rank 0 only).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = list(batches)
    if not batches:
        return []
    b, s = batches[0]["tokens"].shape
    data = iter(batches)
    # counted as each micro-batch's forward returns: a bar over the iterator would stop one short
    # (megatron draws exactly len(batches) items and never asks for the end)
    bar = tqdm(total=len(batches), desc=progress, unit="batch") if progress and is_rank0() \
        else None

    def loss_func(batch, output):
        extra = on_logits(output, batch)
        return torch.zeros((), device=output.device), extra

    def step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        if bar is not None:
            bar.update()
        return out, partial(loss_func, batch)

    shard.model.eval()
    try:
        with torch.no_grad():
            return get_forward_backward_func()(
                forward_step_func=step, data_iterator=data, model=[shard.model],
                num_microbatches=len(batches), seq_length=s, micro_batch_size=b, forward_only=True)
    finally:
        if bar is not None:
            bar.close()


def sum_from_last_stage(fill: Callable[[torch.Tensor], None], shape) -> torch.Tensor:
    """Sum of float64 tensors filled by ``fill`` on each last-stage, TP-rank-0 rank (one per DP
    replica; the others contribute zeros), all-reduced so every rank gets the same total."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(shape, dtype=torch.float64)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        fill(total)
    return all_reduce_sum(total)


def device() -> torch.device | None:
    """This rank's GPU, or None on CPU (tensors stay where they are)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks (on the rank's device for NCCL), returned on the CPU."""
    if not torch.distributed.is_initialized():
        return t
    dev = device()
    t = t.to(dev) if dev else t
    return collectives.all_reduce_sum(t).cpu()


def on_device(batch: dict) -> dict:
    dev = device()
    if dev is None:
        return batch
    return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

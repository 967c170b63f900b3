"""Several continuations after one context in a single row, read as if each had its own row.

Scoring a multiple-choice item forwards ``(context + choice)[:-1]`` once per choice, so the
context is read once per choice: on ARC-Easy and HellaSwag more than half of the tokens scored
are context repeated. Packed instead as one row ``context + k1[:-1] + k2[:-1] + ...``, with the
position ids each token has in its own row (``0..L-1`` for the context, ``L, L+1, ...`` again for
every continuation) and a mask under which a continuation token sees the context and its own
earlier tokens but no other continuation, every token gets the hidden state it gets in its own
row. Two pieces of megatron-core need help for that:

- RoPE: ``GPTModel`` builds its rotary table for positions ``0..s-1`` whatever ``position_ids``
  says (those only reach a learned position embedding). Inside :func:`rope_follows_position_ids`
  the model's rotary embedding hands back the table at each token's position id instead,
  ``[s, b, 1, d]`` rather than ``[s, 1, 1, d]`` (:mod:`.rope` applies either).
- the mask, ``[b, 1, s, s]`` booleans, True where a query may *not* look (megatron's convention),
  which megatron's local attention and :mod:`.sdpa` both take.

:func:`supported` says where this holds: megatron's own (local) attention without a sliding
window, context parallelism or multi-latent attention, RoPE or no rotary positions, no
multi-token prediction. Elsewhere (Transformer Engine's attention, which reads masks its own way)
callers keep one row per continuation.
"""

from __future__ import annotations

import contextlib

import torch


def mask_from_segments(segments: torch.Tensor) -> torch.Tensor:
    """Attention mask [b, 1, s, s] (True = hidden) from segment ids [b, s]: 0 is the shared
    context, ``k > 0`` the k-th continuation, -1 padding. A token sees earlier tokens of the
    context and of its own segment, and always itself (so a padding row is never all hidden)."""
    s = segments.shape[1]
    idx = torch.arange(s, device=segments.device)
    causal = idx[:, None] >= idx[None, :]
    q, k = segments[:, :, None], segments[:, None, :]
    visible = causal & ((k == 0) | (k == q))
    visible |= torch.eye(s, dtype=torch.bool, device=segments.device)
    return ~visible[:, None]


def supported(model) -> bool:
    """Whether ``model`` (a megatron GPTModel, possibly wrapped) reads shared-context rows as it
    reads separate ones (see the module note)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.utils import unwrap_model

    gpt = unwrap_model(model)
    cfg = getattr(gpt, "config", None)
    if cfg is None or getattr(gpt, "position_embedding_type", None) not in (
            "rope", "learned_absolute", "none"):
        return False
    if (getattr(cfg, "window_size", None) is not None
            or getattr(cfg, "context_parallel_size", 1) != 1
            or getattr(cfg, "multi_latent_attention", False)
            or getattr(cfg, "mtp_num_layers", None)
            or getattr(gpt, "mtp_process", False)):
        return False
    cores = [m.core_attention for m in gpt.modules() if hasattr(m, "core_attention")]
    return all(isinstance(c, DotProductAttention) for c in cores)


@contextlib.contextmanager
def rope_follows_position_ids(model):
    """While active, ``model``'s rotary embedding (if it has one) gives each token the table row
    of its ``position_ids`` entry instead of its index in the sequence."""
    from megatron.core.utils import unwrap_model

    gpt = unwrap_model(model)
    rotary = getattr(gpt, "rotary_pos_emb", None)
    if getattr(gpt, "position_embedding_type", None) != "rope" or rotary is None:
        yield
        return
    seen: dict = {}
    model_forward, rotary_forward = gpt.forward, rotary.forward

    def forward(*args, **kwargs):
        pos = args[1] if len(args) > 1 else kwargs.get("position_ids")
        seen["pos"] = pos
        try:
            return model_forward(*args, **kwargs)
        finally:
            seen.pop("pos", None)

    def rotary_at(max_seq_len, *args, **kwargs):
        pos = seen.get("pos")
        if pos is None:
            return rotary_forward(max_seq_len, *args, **kwargs)
        if pos.shape[1] != max_seq_len:
            raise RuntimeError(f"position_ids cover {pos.shape[1]} tokens, the rotary table "
                               f"{max_seq_len}")
        table = rotary_forward(int(pos.max()) + 1)  # [P, 1, 1, d]
        return table[:, 0][pos.t().to(table.device)]  # [s, b, 1, d]

    gpt.forward, rotary.forward = forward, rotary_at  # instance attributes, looked up first
    try:
        yield
    finally:
        del gpt.forward, rotary.forward

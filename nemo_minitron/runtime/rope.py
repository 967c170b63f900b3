"""Rotary position embedding with its cos/sin tables made once per forward, not once per layer.

Installed under both layer specs; it also applies LongRoPE (Phi-3's 128k variants), which
megatron-core has no setting for: its attention factor as a scale of cos and sin, and its long
factors for sequences past the pretraining context (:func:`long_freqs`).

megatron-core's unfused RoPE (``apply_rotary_pos_emb``, what every attention layer of the local
spec calls when Transformer Engine's fused kernel is absent) recomputes ``cos``/``sin`` of the
frequencies and casts them to the activation dtype for the query *and* the key of *every* layer,
builds the rotated half with ``neg`` + ``cat`` and concatenates the result once more with the
(usually empty) unrotated dims. On CPU that is ~35% of a bf16 forward: memory-bound passes over
[s, b, heads, d], more in the backward. Here the tables are cached per frequency tensor (megatron
caches that tensor per sequence length, so one entry per length, dtype and scale) and the
rotation is one autograd function over the two halves, whose backward is the inverse rotation:
no activations saved, three passes over the tensor each way.

The arithmetic is megatron's, operation for operation (each product rounded to the activation
dtype, then the sum), so results are bitwise equal to its path in fp32 and bf16. Only the plain
case goes here (one sequence layout ``[s, b, heads, d]``, one table for every row ``[s, 1, 1, r]``
or one per row ``[s, b, 1, r]`` (:mod:`.shared_context`), halves not interleaved, no packed
sequences, no multi-latent attention, no fused kernel); anything else calls megatron's function.
"""

from __future__ import annotations

import torch

_ORIGINAL = None
_TABLES: dict = {}
_MAX_TABLES = 8


def _tables(freqs: torch.Tensor, dtype: torch.dtype, mscale: float):
    """(cos, sin) of one half of ``freqs`` [s, 1, 1, r] in ``dtype`` (as megatron rounds them), or
    None when the two halves differ (a layout this kernel does not cover)."""
    key = (id(freqs), dtype, float(mscale))
    hit = _TABLES.get(key)
    if hit is not None and hit[0] is freqs:
        return hit[1]
    h = freqs.shape[-1] // 2
    tables = None
    if torch.equal(freqs[..., :h], freqs[..., h:]):
        # of the whole tensor, as megatron computes them (a vectorised cos of a strided half could
        # round differently)
        tables = tuple((f(freqs) * mscale).to(dtype)[..., :h].contiguous()
                       for f in (torch.cos, torch.sin))
    if len(_TABLES) >= _MAX_TABLES:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[key] = (freqs, tables)  # holding freqs keeps its id from being reused
    return tables


_LONG: dict = {}


def long_freqs(freqs: torch.Tensor, long_inv_freq: torch.Tensor) -> torch.Tensor:
    """LongRoPE's table for a sequence past the pretraining context: the positions of ``freqs``
    (``[s, b or 1, 1, r]``, made by megatron from the short factors) times the long factors'
    inverse frequencies, as Hugging Face switches to them for any forward longer than that
    context (one table for the whole sequence, its first positions included). Cached per
    length: the rotary module caches its tables per length, so the same tensor comes back."""
    if freqs.dim() != 4 or freqs.shape[1] != 1:  # per-row positions (shared-context scoring)
        raise ValueError(f"a {freqs.shape[0]}-token row of several requests is longer than the "
                         "pretraining context of LongRoPE's short factors; score its requests "
                         "one per row")
    key = (freqs.shape, freqs.device, freqs.dtype)
    hit = _LONG.get(key)
    if hit is not None:
        return hit
    s, r = freqs.shape[0], freqs.shape[-1]
    inv = long_inv_freq.to(device=freqs.device, dtype=torch.float32)
    if r != 2 * inv.numel():
        raise ValueError(f"LongRoPE: {inv.numel()} long factors for {r} rotary dims")
    pos = torch.arange(s, device=freqs.device, dtype=torch.float32)
    half = torch.outer(pos, inv)
    out = torch.cat((half, half), dim=-1)[:, None, None, :].expand(freqs.shape).to(freqs.dtype)
    if len(_LONG) >= _MAX_TABLES:
        _LONG.pop(next(iter(_LONG)))
    _LONG[key] = out
    return out


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] (the inverse flips the sign of sin); dims
    past the rotary ones are copied."""
    h = cos.shape[-1]
    r = 2 * h
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    x1, x2, o1, o2 = t[..., :h], t[..., h:r], out[..., :h], out[..., h:r]
    tmp = torch.empty(x1.shape, dtype=t.dtype, device=t.device)
    torch.mul(x1, cos, out=o1)
    torch.mul(x2, sin, out=tmp)
    (o1.add_ if inverse else o1.sub_)(tmp)
    torch.mul(x2, cos, out=o2)
    torch.mul(x1, sin, out=tmp)
    (o2.sub_ if inverse else o2.add_)(tmp)
    if r < t.shape[-1]:
        out[..., r:].copy_(t[..., r:])
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(t, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, inverse=True), None, None


def _plain_case(t, freqs, config, cu_seqlens) -> bool:
    return (cu_seqlens is None and not config.apply_rope_fusion and not config.rotary_interleaved
            and not config.multi_latent_attention and t.dim() == 4 and freqs.dim() == 4
            and freqs.shape[0] == t.shape[0] and freqs.shape[1] in (1, t.shape[1])
            and freqs.shape[2] == 1
            and freqs.shape[-1] % 2 == 0 and freqs.shape[-1] <= t.shape[-1])


def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):
    """Drop-in for megatron-core's function of the same name (same arguments, same result), with
    LongRoPE's factor on cos/sin (``config.rope_attention_factor``, as Hugging Face applies it)."""
    limit = getattr(config, "rope_context_limit", None)
    if limit is not None and freqs.shape[0] > limit:  # past the pretraining context
        freqs = long_freqs(freqs, config.rope_long_inv_freq)
    mscale = mscale * getattr(config, "rope_attention_factor", 1.0)
    if _plain_case(t, freqs, config, cu_seqlens):
        tables = _tables(freqs, t.dtype, mscale)
        if tables is not None:
            return _Rotary.apply(t, *tables)
    return _ORIGINAL(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)


def install() -> None:
    """Route megatron-core's attention layers through :func:`apply_rotary_pos_emb` (idempotent;
    process-wide, which is safe: the plain case computes what megatron's own path computes)."""
    global _ORIGINAL
    from megatron.core.transformer import attention

    if _ORIGINAL is None:
        _ORIGINAL = attention.apply_rotary_pos_emb
        attention.apply_rotary_pos_emb = apply_rotary_pos_emb

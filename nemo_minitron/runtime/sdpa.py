"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for the local spec.

megatron-core's local ``DotProductAttention`` materialises the [b, heads, s, s] scores, copies
them to fp32 for the softmax and back, masks with a full boolean matrix and multiplies with two
batched matmuls: on CPU that is ~15% of a distillation step, more in bf16, where the copies cost
as much as the matmuls. PyTorch's fused kernel (flash attention on CPU and GPU) does the same
causal attention in one pass with fp32 accumulation. Used for the causal, dropout-free case every
stage here runs, and for an explicit boolean mask (True = hidden, megatron's convention; it then
stands in for the causal one, as in megatron's softmax: :mod:`.shared_context` builds such masks
for scoring); anything else (a non-boolean mask, dropout, packed sequences,
query-key layer scaling, a learnable softmax offset) goes to megatron's implementation.
A sliding window (``config.window_size``, Mistral-7B-v0.1's and Phi-3-mini-4k's attention) is a
banded causal mask here, made only when a sequence is longer than the window; megatron's own
path cannot take one on CPU (its window mask is built on CUDA), so it is refused there.
The Transformer Engine spec (GPUs with TE) has its own fused attention and does not use this.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    def _fused_ok(self, attention_mask, attn_mask_type, attention_bias, packed_seq_params) -> bool:
        cfg = self.config
        mask_ok = attention_mask is None or attention_mask.dtype == torch.bool
        return (mask_ok and attention_bias is None and packed_seq_params is None
                and (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
                and not cfg.apply_query_key_layer_scaling
                and getattr(cfg, "softmax_type", "vanilla") == "vanilla"
                and (not self.training or cfg.attention_dropout == 0.0))

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        window = self.config.window_size
        if window is not None and query.size(0) <= window[0] + 1:
            window = None  # every token sees all earlier ones anyway: plain causal attention
        if not self._fused_ok(attention_mask, attn_mask_type, attention_bias, packed_seq_params):
            if window is not None and not torch.cuda.is_available():
                raise NotImplementedError("sliding-window attention on CPU needs the fused path "
                                          "(causal, no dropout, no packed sequences)")
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        if window is not None:
            if attention_mask is not None:  # scoring masks are built for full attention
                raise NotImplementedError(
                    f"a {query.size(0)}-token row with its own attention mask is longer than the "
                    f"sliding window ({window[0] + 1}); score such rows one request at a time")
            attention_mask = _outside_window(query.size(0), window[0] + 1, query.device)
        # GQA in the kernel (enable_gqa): no repeated key/value heads to write, and no sum of
        # their gradients in the backward (which zero-filled and added [s, b, heads, d] buffers)
        gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if attention_mask is None:
            ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        else:  # megatron's mask hides where True, and replaces the causal one (as in its softmax)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        sq, b = query.size(0), query.size(1)
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


@functools.lru_cache(maxsize=8)  # one per sequence length: every layer of a forward asks
def _outside_window(s: int, window: int, device) -> torch.Tensor:
    """[s, s] True where key j is hidden from query i: later (j > i), or ``window`` or more
    tokens earlier (i - j >= window)."""
    i = torch.arange(s, device=device)
    d = i[:, None] - i[None, :]
    return (d < 0) | (d >= window)

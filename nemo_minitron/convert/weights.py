"""Explicit weight maps between our canonical layout and megatron-core's sharded modules.

Canonical layout = Hugging Face Llama names, one full (unsharded) tensor per projection:
``model.layers.{i}.self_attn.q_proj.weight`` and so on. It is what checkpoints store, what pruning
slices and what export writes. megatron-core fuses Q/K/V per query group (``[q heads of group g; k_g;
v_g]`` for g in groups) and gate/up per tensor-parallel shard (``[gate_r; up_r]``); both are split
over TP ranks along their output dimension, ``linear_proj``/``linear_fc2`` along their input.
These functions are pure: tensors in, tensors out.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..arch import Arch

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
LAYER = "model.layers.{}."
# canonical suffix -> (megatron local-spec suffix, TE-spec suffix)
NORMS = {
    "input_layernorm.weight": ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    "post_attention_layernorm.weight": ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
}


def canonical_keys(arch: Arch) -> list[str]:
    keys = [EMBED]
    for i in range(arch.num_layers):
        p = LAYER.format(i)
        keys += [p + s for s in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                 "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                 "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")]
        if arch.qkv_bias:
            keys += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
    keys.append(FINAL_NORM)
    if not arch.tie_embeddings:
        keys.append(LM_HEAD)
    return keys


def canonical_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Shape of every canonical tensor of ``arch`` (what a checkpoint must store)."""
    h, f, d, v = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim, arch.vocab_size
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    per_layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                 "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                 "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                 "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
                 "mlp.down_proj.weight": (h, f), "self_attn.q_proj.bias": (q,),
                 "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    fixed = {EMBED: (v, h), FINAL_NORM: (h,), LM_HEAD: (v, h)}
    return {k: fixed[k] if k in fixed else per_layer[k.split(".", 3)[3]]
            for k in canonical_keys(arch)}


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    if w.shape[0] == rows:
        return w
    out = w.new_zeros((rows,) + tuple(w.shape[1:]))
    out[: w.shape[0]] = w
    return out


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: Arch) -> torch.Tensor:
    """[q; k; v] (per projection) -> megatron's per-group interleave, rows first."""
    g, hpg, d = arch.num_query_groups, arch.heads_per_group, arch.head_dim
    rest = tuple(q.shape[1:])
    q = q.reshape((g, hpg * d) + rest)
    k = k.reshape((g, d) + rest)
    v = v.reshape((g, d) + rest)
    return torch.cat([q, k, v], dim=1).reshape((g * (hpg + 2) * d,) + rest)


def split_qkv(fused: torch.Tensor, arch: Arch, groups: int | None = None):
    """Inverse of :func:`fuse_qkv` for ``groups`` query groups (default: all)."""
    g = arch.num_query_groups if groups is None else groups
    hpg, d = arch.heads_per_group, arch.head_dim
    rest = tuple(fused.shape[1:])
    x = fused.reshape((g, (hpg + 2) * d) + rest)
    q, k, v = torch.split(x, [hpg * d, d, d], dim=1)
    return (q.reshape((g * hpg * d,) + rest), k.reshape((g * d,) + rest), v.reshape((g * d,) + rest))


def to_megatron(get: Callable[[str], torch.Tensor], arch: Arch, *, tp_rank: int, tp_size: int,
                layers: Iterable[int], pre_process: bool, post_process: bool,
                te: bool = False) -> dict[str, torch.Tensor]:
    """State dict of one (tp_rank, pipeline stage) model from canonical tensors fetched by ``get``.

    ``layers`` are the global indices this stage holds, in order; megatron numbers them from 0.
    """
    out: dict[str, torch.Tensor] = {}
    vpad = arch.padded_vocab_size(tp_size)

    def shard(t: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.chunk(t, tp_size, dim=dim)[tp_rank].contiguous()

    if pre_process:
        out["embedding.word_embeddings.weight"] = shard(_pad_rows(get(EMBED), vpad), 0)
    for local, i in enumerate(layers):
        p, m = LAYER.format(i), f"decoder.layers.{local}."
        for canon, names in NORMS.items():
            out[m + names[int(te)]] = get(p + canon)
        qkv = fuse_qkv(get(p + "self_attn.q_proj.weight"), get(p + "self_attn.k_proj.weight"),
                       get(p + "self_attn.v_proj.weight"), arch)
        out[m + "self_attention.linear_qkv.weight"] = shard(qkv, 0)
        if arch.qkv_bias:
            b = fuse_qkv(get(p + "self_attn.q_proj.bias"), get(p + "self_attn.k_proj.bias"),
                         get(p + "self_attn.v_proj.bias"), arch)
            out[m + "self_attention.linear_qkv.bias"] = shard(b, 0)
        out[m + "self_attention.linear_proj.weight"] = shard(get(p + "self_attn.o_proj.weight"), 1)
        gate, up = get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")
        out[m + "mlp.linear_fc1.weight"] = torch.cat([shard(gate, 0), shard(up, 0)], dim=0)
        out[m + "mlp.linear_fc2.weight"] = shard(get(p + "mlp.down_proj.weight"), 1)
    if post_process:
        out["decoder.final_layernorm.weight"] = get(FINAL_NORM)
        # Tied and on one stage, megatron reuses the embedding; a separate last stage keeps a copy.
        if not (arch.tie_embeddings and pre_process):
            head = get(EMBED) if arch.tie_embeddings else get(LM_HEAD)
            out["output_layer.weight"] = shard(_pad_rows(head, vpad), 0)
    return out


def from_megatron(shards: list[dict[str, torch.Tensor]], arch: Arch, *, layers: Iterable[int],
                  pre_process: bool, post_process: bool, te: bool = False) -> dict[str, torch.Tensor]:
    """Canonical tensors of one pipeline stage from the state dicts of all its TP ranks (in order)."""
    tp = len(shards)
    out: dict[str, torch.Tensor] = {}

    def cat(key: str, dim: int) -> torch.Tensor:
        return torch.cat([s[key] for s in shards], dim=dim)

    if pre_process:
        out[EMBED] = cat("embedding.word_embeddings.weight", 0)[: arch.vocab_size].clone()
    for local, i in enumerate(layers):
        p, m = LAYER.format(i), f"decoder.layers.{local}."
        for canon, names in NORMS.items():
            out[p + canon] = shards[0][m + names[int(te)]].clone()
        groups = arch.num_query_groups // tp
        parts = [split_qkv(s[m + "self_attention.linear_qkv.weight"], arch, groups) for s in shards]
        for j, x in enumerate("qkv"):
            out[p + f"self_attn.{x}_proj.weight"] = torch.cat([pt[j] for pt in parts], dim=0)
        if arch.qkv_bias:
            parts = [split_qkv(s[m + "self_attention.linear_qkv.bias"], arch, groups) for s in shards]
            for j, x in enumerate("qkv"):
                out[p + f"self_attn.{x}_proj.bias"] = torch.cat([pt[j] for pt in parts], dim=0)
        out[p + "self_attn.o_proj.weight"] = cat(m + "self_attention.linear_proj.weight", 1)
        halves = [torch.chunk(s[m + "mlp.linear_fc1.weight"], 2, dim=0) for s in shards]
        out[p + "mlp.gate_proj.weight"] = torch.cat([h[0] for h in halves], dim=0)
        out[p + "mlp.up_proj.weight"] = torch.cat([h[1] for h in halves], dim=0)
        out[p + "mlp.down_proj.weight"] = cat(m + "mlp.linear_fc2.weight", 1)
    if post_process:
        out[FINAL_NORM] = shards[0]["decoder.final_layernorm.weight"].clone()
        if not arch.tie_embeddings:
            out[LM_HEAD] = cat("output_layer.weight", 0)[: arch.vocab_size].clone()
        elif not pre_process:  # the last stage's copy of the tied embedding
            out[EMBED] = cat("output_layer.weight", 0)[: arch.vocab_size].clone()
    return out

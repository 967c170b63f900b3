"""Explicit weight maps between our canonical layout and megatron-core's sharded modules.

Canonical layout = Hugging Face Llama names, one full (unsharded) tensor per projection:
``model.layers.{i}.self_attn.q_proj.weight`` and so on. It is what checkpoints store, what pruning
slices and what export writes. megatron-core fuses Q/K/V per query group (``[q heads of group g; k_g;
v_g]`` for g in groups) and gate/up per tensor-parallel shard (``[gate_r; up_r]``); both are split
over TP ranks along their output dimension, ``linear_proj``/``linear_fc2`` along their input.
A non-gated (squared-ReLU) MLP has no gate: ``linear_fc1`` is the up projection alone. QK-norm
weights (one per head_dim, shared by every head) are replicated on every TP rank. Zero-centred
LayerNorm weights (Nemotron's ``1p``) are folded, +1, on the way into megatron -- whose local
spec's torch LayerNorm has no zero-centred option -- and unfolded on the way back, so canonical
tensors keep Hugging Face's values.

Mixture-of-experts layers (Mixtral, Qwen3-MoE) are stored one tensor per expert under the hub's
names (:attr:`~nemo_minitron.families.Family.expert_keys`); in megatron each expert is a SwiGLU
``MLP`` (``mlp.experts.local_experts.{k}``, fused gate/up per TP shard as above), the router
``mlp.router.weight`` is replicated, and the pre-MLP norm stays a separate module under both
specs (the router needs its output). With expert parallelism rank ``e`` holds experts
``e*E/ep .. (e+1)*E/ep - 1`` as its local experts ``0..E/ep-1``. :func:`from_megatron` expects
every expert of a layer in its shards (EP ranks gathered first, local numbers made global).
A shared expert (Qwen2-MoE) is ``mlp.shared_experts``: a TP-sharded SwiGLU MLP like a dense one,
on every EP rank, with its sigmoid gate's [1, hidden] ``gate_weight`` replicated.
These functions are pure: tensors in, tensors out.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..arch import Arch
from ..families import family

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
FINAL_NORM_BIAS = "model.norm.bias"
LM_HEAD = "lm_head.weight"
LAYER = "model.layers.{}."
# canonical suffix -> (megatron local-spec suffix, TE-spec suffix)
NORMS = {
    "input_layernorm.weight": ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    "post_attention_layernorm.weight": ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
}
NORM_BIASES = {
    "input_layernorm.bias": ("input_layernorm.bias", "self_attention.linear_qkv.layer_norm_bias"),
    "post_attention_layernorm.bias": ("pre_mlp_layernorm.bias", "mlp.linear_fc1.layer_norm_bias"),
}
QK_NORMS = {"self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
            "self_attn.k_norm.weight": "self_attention.k_layernorm.weight"}


def router_key(arch: Arch) -> str:
    """Canonical suffix of an MoE layer's router weight [experts, hidden]."""
    return family(arch.model_type).expert_keys[0]


def expert_keys(arch: Arch, j: int) -> tuple[str, str, str]:
    """Canonical suffixes of expert ``j``'s (gate, up, down) weights."""
    return tuple(k.format(j) for k in family(arch.model_type).expert_keys[1:])


def shared_keys(arch: Arch) -> tuple[str, ...]:
    """Canonical suffixes of the shared expert's (gate, up, down, gate score); () without one."""
    return family(arch.model_type).shared_keys if arch.has_shared_expert else ()


def mlp_suffixes(arch: Arch) -> list[str]:
    if arch.is_moe:
        return [router_key(arch)] + [k for j in range(arch.num_experts) for k in expert_keys(arch, j)
                                     ] + list(shared_keys(arch))
    return (["mlp.gate_proj.weight"] if arch.mlp == "swiglu" else []) + [
        "mlp.up_proj.weight", "mlp.down_proj.weight"]


def layer_suffixes(arch: Arch) -> list[str]:
    """Canonical tensor names of one decoder layer, in the order checkpoints list them."""
    out = list(NORMS)
    if arch.norm == "layernorm1p":
        out += list(NORM_BIASES)
    out += [f"self_attn.{x}_proj.weight" for x in "qkvo"]
    if arch.qk_norm:
        out += list(QK_NORMS)
    out += mlp_suffixes(arch)
    if arch.qkv_bias:
        out += [f"self_attn.{x}_proj.bias" for x in "qkv"]
    return out


def final_norm_keys(arch: Arch) -> list[str]:
    return [FINAL_NORM] + ([FINAL_NORM_BIAS] if arch.norm == "layernorm1p" else [])


def canonical_keys(arch: Arch) -> list[str]:
    keys = [EMBED]
    suffixes = layer_suffixes(arch)
    for i in range(arch.num_layers):
        keys += [LAYER.format(i) + s for s in suffixes]
    keys += final_norm_keys(arch)
    if not arch.tie_embeddings:
        keys.append(LM_HEAD)
    return keys


def _norm_offset(arch: Arch) -> float:
    """What megatron's norm weight adds to the stored one: 1 for zero-centred (1p) weights."""
    return 1.0 if arch.norm == "layernorm1p" else 0.0


def canonical_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Shape of every canonical tensor of ``arch`` (what a checkpoint must store)."""
    h, f, d, v = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim, arch.vocab_size
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    per_layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                 "input_layernorm.bias": (h,), "post_attention_layernorm.bias": (h,),
                 "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                 "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                 "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
                 "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
                 "mlp.down_proj.weight": (h, f), "self_attn.q_proj.bias": (q,),
                 "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    if arch.is_moe:
        per_layer[router_key(arch)] = (arch.num_experts, h)
        for j in range(arch.num_experts):
            gate, up, down = expert_keys(arch, j)
            per_layer.update({gate: (f, h), up: (f, h), down: (h, f)})
    if arch.has_shared_expert:
        fs = arch.moe_shared_expert_intermediate_size
        per_layer.update(zip(shared_keys(arch), ((fs, h), (fs, h), (h, fs), (1, h))))
    fixed = {EMBED: (v, h), FINAL_NORM: (h,), FINAL_NORM_BIAS: (h,), LM_HEAD: (v, h)}
    return {k: fixed[k] if k in fixed else per_layer[k.split(".", 3)[3]]
            for k in canonical_keys(arch)}


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    if w.shape[0] == rows:
        return w
    out = w.new_zeros((rows,) + tuple(w.shape[1:]))
    out[: w.shape[0]] = w
    return out


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: Arch,
             groups: int | None = None) -> torch.Tensor:
    """[q; k; v] (per projection) -> megatron's per-group interleave, rows first, for ``groups``
    query groups (default: all; a TP rank's rows hold ``num_query_groups / tp`` of them)."""
    g = arch.num_query_groups if groups is None else groups
    hpg, d = arch.heads_per_group, arch.head_dim
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


def _norm_name(arch: Arch, names: tuple, te: bool) -> str:
    # an MoE layer keeps its pre-MLP norm separate under the TE spec too
    return names[0] if arch.is_moe and names[0].startswith("pre_mlp") else names[int(te)]


def _swiglu_to(shard: Callable[[str, int], torch.Tensor], prefix: str, names) -> dict:
    """The SwiGLU MLP at ``prefix`` of one TP rank from canonical (gate, up, down)."""
    gate, up, down = names
    return {prefix + "linear_fc1.weight": torch.cat([shard(gate, 0), shard(up, 0)]),
            prefix + "linear_fc2.weight": shard(down, 1)}


def to_megatron(get: Callable[[str], torch.Tensor], arch: Arch, *, tp_rank: int, tp_size: int,
                layers: Iterable[int], pre_process: bool, post_process: bool,
                te: bool = False, ep_rank: int = 0, ep_size: int = 1,
                get_part: Callable[[str, int, int, int], torch.Tensor] | None = None,
                ) -> dict[str, torch.Tensor]:
    """State dict of one (tp_rank, ep_rank, pipeline stage) model from canonical tensors fetched
    by ``get``. ``layers`` are the global indices this stage holds, in order; megatron numbers
    them from 0. Experts are split over TP like a dense MLP (expert-TP = TP).
    ``get_part(name, dim, rank, parts)``: part ``rank`` of ``parts`` equal parts of a tensor along
    ``dim``, read without the rest (a checkpoint's sliced read); default: ``get`` and chunk.
    Every TP-sharded tensor is fetched this way: the shard of the fused QKV is the fusion of the
    shards of Q, K and V (query groups are contiguous in each).
    """
    out: dict[str, torch.Tensor] = {}
    vpad = arch.padded_vocab_size(tp_size)
    if get_part is None:
        def get_part(name: str, dim: int, rank: int, parts: int) -> torch.Tensor:
            return torch.chunk(get(name), parts, dim=dim)[rank]

    def shard(name: str, dim: int) -> torch.Tensor:
        return get_part(name, dim, tp_rank, tp_size).contiguous()

    def vocab_shard(name: str) -> torch.Tensor:  # padded rows only when vocab % tp != 0
        if vpad == arch.vocab_size:
            return shard(name, 0)
        return torch.chunk(_pad_rows(get(name), vpad), tp_size, dim=0)[tp_rank].contiguous()

    groups = arch.num_query_groups // tp_size
    if pre_process:
        out["embedding.word_embeddings.weight"] = vocab_shard(EMBED)
    one = _norm_offset(arch)
    for local, i in enumerate(layers):
        p, m = LAYER.format(i), f"decoder.layers.{local}."
        for canon, names in NORMS.items():
            out[m + _norm_name(arch, names, te)] = get(p + canon) + one if one else get(p + canon)
        if arch.norm == "layernorm1p":
            for canon, names in NORM_BIASES.items():
                out[m + names[int(te)]] = get(p + canon)
        if arch.qk_norm:
            for canon, name in QK_NORMS.items():
                out[m + name] = get(p + canon)
        out[m + "self_attention.linear_qkv.weight"] = fuse_qkv(
            *(shard(p + f"self_attn.{x}_proj.weight", 0) for x in "qkv"), arch, groups)
        if arch.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = fuse_qkv(
                *(shard(p + f"self_attn.{x}_proj.bias", 0) for x in "qkv"), arch, groups)
        out[m + "self_attention.linear_proj.weight"] = shard(p + "self_attn.o_proj.weight", 1)
        if arch.is_moe:
            out[m + "mlp.router.weight"] = get(p + router_key(arch))
            per_rank = arch.num_experts // ep_size
            for k in range(per_rank):
                out.update(_swiglu_to(shard, m + f"mlp.experts.local_experts.{k}.",
                                      [p + x for x in expert_keys(arch, ep_rank * per_rank + k)]))
            if arch.has_shared_expert:
                gate, up, down, score = (p + x for x in shared_keys(arch))
                out.update(_swiglu_to(shard, m + "mlp.shared_experts.", (gate, up, down)))
                out[m + "mlp.shared_experts.gate_weight"] = get(score)
            continue
        up = shard(p + "mlp.up_proj.weight", 0)
        if arch.mlp == "swiglu":
            up = torch.cat([shard(p + "mlp.gate_proj.weight", 0), up], dim=0)
        out[m + "mlp.linear_fc1.weight"] = up
        out[m + "mlp.linear_fc2.weight"] = shard(p + "mlp.down_proj.weight", 1)
    if post_process:
        out["decoder.final_layernorm.weight"] = get(FINAL_NORM) + one if one else get(FINAL_NORM)
        if arch.norm == "layernorm1p":
            out["decoder.final_layernorm.bias"] = get(FINAL_NORM_BIAS)
        # Tied and on one stage, megatron reuses the embedding; a separate last stage keeps a copy.
        if not (arch.tie_embeddings and pre_process):
            out["output_layer.weight"] = vocab_shard(EMBED if arch.tie_embeddings else LM_HEAD)
    return out


def _swiglu_from(shards: list[dict], prefix: str, names) -> dict[str, torch.Tensor]:
    """Canonical (gate, up, down) of the SwiGLU MLP at ``prefix`` from its TP shards."""
    gate, up, down = names
    halves = [torch.chunk(s[prefix + "linear_fc1.weight"], 2, dim=0) for s in shards]
    return {gate: torch.cat([h[0] for h in halves], dim=0),
            up: torch.cat([h[1] for h in halves], dim=0),
            down: torch.cat([s[prefix + "linear_fc2.weight"] for s in shards], dim=1)}


def from_megatron(shards: list[dict[str, torch.Tensor]], arch: Arch, *, layers: Iterable[int],
                  pre_process: bool, post_process: bool, te: bool = False,
                  tp_size: int | None = None,
                  experts: range | None = None) -> dict[str, torch.Tensor]:
    """Canonical tensors of one pipeline stage from the state dicts of all its TP ranks (in order).
    With ``tp_size`` and one rank's state dict: that rank's slices, under the canonical names
    (what a sharded save writes, :mod:`.sharded`). ``experts``: the global numbers of the
    experts the state dicts hold as local ``0, 1, ...`` (one EP rank's; default: all of them)."""
    tp = tp_size or len(shards)
    out: dict[str, torch.Tensor] = {}

    def cat(key: str, dim: int) -> torch.Tensor:
        return torch.cat([s[key] for s in shards], dim=dim)

    one = _norm_offset(arch)
    if pre_process:
        out[EMBED] = cat("embedding.word_embeddings.weight", 0)[: arch.vocab_size].clone()
    for local, i in enumerate(layers):
        p, m = LAYER.format(i), f"decoder.layers.{local}."
        for canon, names in NORMS.items():
            name = m + _norm_name(arch, names, te)
            out[p + canon] = shards[0][name] - one if one else shards[0][name].clone()
        if arch.norm == "layernorm1p":
            for canon, names in NORM_BIASES.items():
                out[p + canon] = shards[0][m + names[int(te)]].clone()
        if arch.qk_norm:
            for canon, name in QK_NORMS.items():
                out[p + canon] = shards[0][m + name].clone()
        groups = arch.num_query_groups // tp
        parts = [split_qkv(s[m + "self_attention.linear_qkv.weight"], arch, groups) for s in shards]
        for j, x in enumerate("qkv"):
            out[p + f"self_attn.{x}_proj.weight"] = torch.cat([pt[j] for pt in parts], dim=0)
        if arch.qkv_bias:
            parts = [split_qkv(s[m + "self_attention.linear_qkv.bias"], arch, groups) for s in shards]
            for j, x in enumerate("qkv"):
                out[p + f"self_attn.{x}_proj.bias"] = torch.cat([pt[j] for pt in parts], dim=0)
        out[p + "self_attn.o_proj.weight"] = cat(m + "self_attention.linear_proj.weight", 1)
        if arch.is_moe:
            out[p + router_key(arch)] = shards[0][m + "mlp.router.weight"].clone()
            for k, j in enumerate(range(arch.num_experts) if experts is None else experts):
                out.update(_swiglu_from(shards, m + f"mlp.experts.local_experts.{k}.",
                                        (p + x for x in expert_keys(arch, j))))
            if arch.has_shared_expert:
                gate, up, down, score = (p + x for x in shared_keys(arch))
                out.update(_swiglu_from(shards, m + "mlp.shared_experts.", (gate, up, down)))
                out[score] = shards[0][m + "mlp.shared_experts.gate_weight"].clone()
        elif arch.mlp == "swiglu":
            halves = [torch.chunk(s[m + "mlp.linear_fc1.weight"], 2, dim=0) for s in shards]
            out[p + "mlp.gate_proj.weight"] = torch.cat([h[0] for h in halves], dim=0)
            out[p + "mlp.up_proj.weight"] = torch.cat([h[1] for h in halves], dim=0)
        else:
            out[p + "mlp.up_proj.weight"] = cat(m + "mlp.linear_fc1.weight", 0)
        if not arch.is_moe:
            out[p + "mlp.down_proj.weight"] = cat(m + "mlp.linear_fc2.weight", 1)
    if post_process:
        w = shards[0]["decoder.final_layernorm.weight"]
        out[FINAL_NORM] = w - one if one else w.clone()
        if arch.norm == "layernorm1p":
            out[FINAL_NORM_BIAS] = shards[0]["decoder.final_layernorm.bias"].clone()
        if not arch.tie_embeddings:
            out[LM_HEAD] = cat("output_layer.weight", 0)[: arch.vocab_size].clone()
        elif not pre_process:  # the last stage's copy of the tied embedding
            out[EMBED] = cat("output_layer.weight", 0)[: arch.vocab_size].clone()
    return out

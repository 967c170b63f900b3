"""Apply a :class:`~.plan.Plan` to canonical tensors: pure slicing, tensors in, tensors out.

Input and output use the canonical layout of :mod:`nemo_minitron.convert.weights` (Hugging Face
Llama names, full tensors). Every axis of the plan is applied where it appears:

=====================================  ===========================  ===========================
tensor                                 rows (dim 0)                 columns (dim 1)
=====================================  ===========================  ===========================
``model.embed_tokens.weight``          all (vocabulary)             ``hidden``
``*_layernorm.weight``/bias, ``norm``  ``hidden``                   --
``self_attn.q_proj.weight`` / bias     rows of kept ``heads``       ``hidden``
``self_attn.k_proj/v_proj`` / bias     rows of kept ``groups``      ``hidden``
``self_attn.o_proj.weight``            ``hidden``                   columns of kept ``heads``
``self_attn.q_norm/k_norm.weight``     all (head_dim, shared)       --
``mlp.gate_proj/up_proj.weight``       ``ffn``                      ``hidden``
``mlp.down_proj.weight``               ``hidden``                   ``ffn``
``lm_head.weight``                     all (vocabulary)             ``hidden``
=====================================  ===========================  ===========================

Head ``j`` owns rows ``j*d .. (j+1)*d-1`` of ``q_proj`` (and those columns of ``o_proj``); group
``g`` owns rows ``g*d .. (g+1)*d-1`` of ``k_proj``/``v_proj``. Because a valid plan keeps the same
number of heads in every kept group and indices are sorted, kept head ``j'`` of the pruned model
belongs to kept group ``j' // heads_per_group'`` -- the Hugging Face GQA convention still holds.

QK-norm weights act on each head's head_dim, which pruning never changes, and are shared by all
heads, so they are kept whole whichever heads or groups go. A squared-ReLU MLP has no gate; its
neurons are the rows of ``up_proj``. LayerNorm biases are sliced like their weights.

Mixture of experts: the router's rows are the kept experts (columns ``hidden``); each kept
expert's gate/up/down are sliced like a dense MLP with the layer's ``ffn``, and experts are
renumbered ``0..E'-1`` in the order kept, so router row ``e'`` still belongs to expert ``e'``.
A shared expert is sliced like a dense MLP with the layer's ``shared_ffn``; its gate score
``[1, hidden]`` keeps the ``hidden`` columns.

Kept layers are renumbered ``0..L'-1`` in the order of ``plan.layers``.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Union

import torch

from ..convert.weights import (EMBED, LAYER, LM_HEAD, canonical_keys, expert_keys, final_norm_keys,
                               layer_suffixes, mlp_suffixes, router_key, shared_keys)
from .plan import Plan

Tensors = Union[Mapping[str, torch.Tensor], Callable[[str], torch.Tensor]]


def pruned_keys(plan: Plan) -> list[str]:
    """Canonical keys of the pruned model (``canonical_keys(plan.target)``)."""
    return canonical_keys(plan.target)


def _index(idx: list[int], n: int) -> Optional[torch.Tensor]:
    """Index tensor for ``idx`` out of ``n``; ``None`` when it keeps everything in order."""
    if len(idx) == n and list(idx) == list(range(n)):
        return None
    return torch.as_tensor(list(idx), dtype=torch.long)


def _block_index(blocks: list[int], size: int, n_blocks: int) -> Optional[torch.Tensor]:
    """Rows of the kept ``blocks`` (each ``size`` rows long) out of ``n_blocks`` blocks."""
    if len(blocks) == n_blocks and list(blocks) == list(range(n_blocks)):
        return None
    b = torch.as_tensor(list(blocks), dtype=torch.long)
    return (b[:, None] * size + torch.arange(size, dtype=torch.long)[None, :]).reshape(-1)


def _take(w: torch.Tensor, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``w[rows][:, cols]`` as a fresh contiguous tensor (never a view of ``w``)."""
    out = w
    if rows is not None:
        out = out.index_select(0, rows)
    if cols is not None:
        out = out.index_select(1, cols)
    if out is w:
        out = w.clone(memory_format=torch.contiguous_format)
    return out.contiguous()


def _layers_to_do(plan: Plan, layers: Optional[Iterable[int]]) -> list[int]:
    """The source layers to produce: all the plan keeps, or ``layers`` (each must be kept)."""
    if layers is None:
        return list(plan.layers)
    todo = list(layers)
    missing = [i for i in todo if i not in plan.layers]
    if missing:
        raise ValueError(f"layers {missing} are not kept by the plan (kept: {plan.layers}); "
                         "pass source indices of kept layers")
    if len(set(todo)) != len(todo):
        raise ValueError(f"layers {todo} repeats a layer")
    return todo


def _shape_checked(tensors: Tensors) -> Callable[[str, tuple], torch.Tensor]:
    """``get(key, shape)``: the source tensor, checked against the shape the plan expects."""
    if callable(tensors) and not isinstance(tensors, Mapping):
        fetch = tensors
    else:
        mapping = tensors

        def fetch(key: str) -> torch.Tensor:
            try:
                return mapping[key]
            except KeyError:
                raise KeyError(f"source tensor {key!r} is missing") from None

    def get(key: str, shape: tuple) -> torch.Tensor:
        t = fetch(key)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"source tensor {key!r} has shape {tuple(t.shape)}, the plan's source "
                             f"architecture expects {tuple(shape)}")
        return t

    return get


def _dense_rules(src, q_rows, kv_rows, mlp, hid) -> dict:
    """suffix -> (source shape, kept rows, kept columns) of one layer's attention and MLP."""
    h, d, ffn = src.hidden_size, src.head_dim, src.ffn_hidden_size
    nq, ng = src.num_attention_heads * d, src.num_query_groups * d
    return {
        "self_attn.q_proj.weight": ((nq, h), q_rows, hid),
        "self_attn.k_proj.weight": ((ng, h), kv_rows, hid),
        "self_attn.v_proj.weight": ((ng, h), kv_rows, hid),
        "self_attn.o_proj.weight": ((h, nq), hid, q_rows),
        "self_attn.q_norm.weight": ((d,), None, None),
        "self_attn.k_norm.weight": ((d,), None, None),
        "mlp.gate_proj.weight": ((ffn, h), mlp, hid),
        "mlp.up_proj.weight": ((ffn, h), mlp, hid),
        "mlp.down_proj.weight": ((h, ffn), hid, mlp),
        "self_attn.q_proj.bias": ((nq,), q_rows, None),
        "self_attn.k_proj.bias": ((ng,), kv_rows, None),
        "self_attn.v_proj.bias": ((ng,), kv_rows, None),
    }


def _prune_layer(plan: Plan, get, s: int, new: int, hid) -> dict[str, torch.Tensor]:
    """Source layer ``s`` as the pruned model's layer ``new``: heads, query groups and MLP
    neurons (or experts) along their axes, hidden channels along every hidden axis."""
    src = plan.source
    h, d, ffn = src.hidden_size, src.head_dim, src.ffn_hidden_size
    p, n = LAYER.format(s), LAYER.format(new)
    keep_ffn, keep_groups, keep_heads = plan.layer_keep(s)
    mlp = _index(keep_ffn, ffn)
    rules = _dense_rules(src, _block_index(keep_heads, d, src.num_attention_heads),
                         _block_index(keep_groups, d, src.num_query_groups), mlp, hid)
    moe_suffixes = set(mlp_suffixes(src)) if src.is_moe else set()
    out = {}
    for suffix in layer_suffixes(src):
        if suffix in moe_suffixes:
            continue
        shape, rows, cols = rules.get(suffix, ((h,), hid, None))  # the rest: norms over hidden
        out[n + suffix] = _take(get(p + suffix, shape), rows, cols)
    if src.is_moe:
        kept = plan.layer_experts(s)
        out[n + router_key(src)] = _take(get(p + router_key(src), (src.num_experts, h)),
                                         _index(kept, src.num_experts), hid)
        for new_e, old in enumerate(kept):
            pairs = zip(expert_keys(src, old), expert_keys(src, new_e), _swiglu_rules(ffn, h, mlp, hid))
            for a, b, (shape, rows, cols) in pairs:
                out[n + b] = _take(get(p + a, shape), rows, cols)
    if src.has_shared_expert:
        fs = src.moe_shared_expert_intermediate_size
        rules = (*_swiglu_rules(fs, h, _index(plan.layer_shared(s), fs), hid), ((1, h), None, hid))
        for key, (shape, rows, cols) in zip(shared_keys(src), rules):
            out[n + key] = _take(get(p + key, shape), rows, cols)
    return out


def _swiglu_rules(ffn: int, h: int, neurons, hid) -> tuple:
    """(source shape, kept rows, kept columns) of a SwiGLU MLP's gate and up (rows: neurons,
    columns: hidden) and down (rows: hidden, columns: neurons)."""
    return (((ffn, h), neurons, hid), ((ffn, h), neurons, hid), ((h, ffn), hid, neurons))


def apply_plan(plan: Plan, tensors: Tensors, *, layers: Optional[Iterable[int]] = None,
               include_embedding: Optional[bool] = None,
               include_head: Optional[bool] = None) -> dict[str, torch.Tensor]:
    """Canonical tensors of the model that ``plan`` makes out of ``tensors``.

    ``tensors`` is a mapping of canonical source keys, or a getter ``key -> Tensor`` so that only
    what is needed is loaded (each source key is fetched at most once).

    ``layers``: ``None`` (default) produces the whole pruned model, i.e. exactly
    :func:`pruned_keys`. Otherwise only the decoder layers in ``layers`` are produced; these are
    **source** layer indices, each of which must be kept by the plan. Their output keys use the
    layer's **new global index**, its position in ``plan.layers`` (so ``plan.layers = [0, 2, 5]``
    and ``layers=[5]`` gives ``model.layers.2.*``), which makes the outputs of several stages merge
    into the full result with ``dict.update``.

    ``include_embedding`` / ``include_head`` (default: ``layers is None``) add
    ``model.embed_tokens.weight`` and, respectively, ``model.norm.weight`` plus ``lm_head.weight``.
    For tied embeddings there is no ``lm_head.weight``; ``include_head`` then emits
    ``model.embed_tokens.weight`` instead, since it is the output layer's weight.
    """
    plan.validate()
    src, tgt = plan.source, plan.target
    if include_embedding is None:
        include_embedding = layers is None
    if include_head is None:
        include_head = layers is None
    todo = _layers_to_do(plan, layers)
    new_index = {s: n for n, s in enumerate(plan.layers)}
    get = _shape_checked(tensors)
    h, V = src.hidden_size, src.vocab_size
    hid = _index(plan.hidden, h)

    out: dict[str, torch.Tensor] = {}
    if include_embedding or (include_head and tgt.tie_embeddings):
        out[EMBED] = _take(get(EMBED, (V, h)), None, hid)
    for s in todo:
        out.update(_prune_layer(plan, get, s, new_index[s], hid))
    if include_head:
        for key in final_norm_keys(src):
            out[key] = _take(get(key, (h,)), hid)
        if not tgt.tie_embeddings:
            out[LM_HEAD] = _take(get(LM_HEAD, (V, h)), None, hid)
    return out

"""Fused attention and MLP projections on the hub (Phi-3), brought to the layout we store.

Phi-3 checkpoints hold each layer's query, key and value projections as one
``self_attn.qkv_proj.weight`` ([q heads; k groups; v groups] rows, ``head_dim`` each) and its
gate and up projections as one ``mlp.gate_up_proj.weight`` ([gate; up] rows). Our canonical layout
(Llama names, one tensor per projection) is what pruning slices, so import splits them
(:func:`unfuse`) and an export written as such a family joins them again (:func:`fuse`).
These functions are pure: tensors in, tensors out.
"""

from __future__ import annotations

import re

import torch

from ..arch import Arch
from .weights import LAYER

QKV, GATE_UP = "self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"
_PARTS = {QKV: ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
          GATE_UP: ("mlp.gate_proj.weight", "mlp.up_proj.weight")}
_LAYER_KEY = re.compile(r"(model\.layers\.\d+\.)(.+)$")


def _rows(arch: Arch, fused: str) -> list[int]:
    if fused == QKV:
        kv = arch.num_query_groups * arch.head_dim
        return [arch.num_attention_heads * arch.head_dim, kv, kv]
    return [arch.ffn_hidden_size, arch.ffn_hidden_size]


def unfuse(state: dict[str, torch.Tensor], arch: Arch) -> dict[str, torch.Tensor]:
    """``state`` with every fused projection split into its canonical parts (others pass)."""
    out = {}
    for k, v in state.items():
        m = _LAYER_KEY.match(k)
        if m is None or m.group(2) not in _PARTS:
            out[k] = v
            continue
        rows = _rows(arch, m.group(2))
        if v.shape[0] != sum(rows):
            raise ValueError(f"{k} has {v.shape[0]} rows; config.json's sizes need "
                             f"{' + '.join(map(str, rows))} = {sum(rows)}")
        for name, part in zip(_PARTS[m.group(2)], v.split(rows, dim=0)):
            out[m.group(1) + name] = part.contiguous()
    return out


def fused_names(arch: Arch) -> dict[str, tuple[str, ...]]:
    """Every fused tensor name of ``arch`` -> the canonical names it joins, in order."""
    return {LAYER.format(i) + f: tuple(LAYER.format(i) + p for p in parts)
            for i in range(arch.num_layers) for f, parts in _PARTS.items()}


def fuse(tensors: dict[str, torch.Tensor], arch: Arch) -> dict[str, torch.Tensor]:
    """``tensors`` with every complete group of canonical parts joined under its fused name;
    parts whose group is incomplete here stay as they are."""
    out = dict(tensors)
    for name, parts in fused_names(arch).items():
        if all(p in out for p in parts):
            out[name] = torch.cat([out.pop(p) for p in parts], dim=0)
    return out

"""Hugging Face's two layouts of MoE expert weights, brought to the one we store.

Checkpoints on the hub, and what ``save_pretrained`` writes, hold one tensor per expert
(Mixtral: ``block_sparse_moe.experts.{j}.w1/w3/w2``, Qwen3-MoE: ``mlp.experts.{j}.gate_proj/
up_proj/down_proj``), and that is our canonical layout. transformers 5.x models hold the experts
of a layer fused in memory -- ``mlp.experts.gate_up_proj`` [experts, 2*ffn, hidden] (gate rows
first, then up) and ``mlp.experts.down_proj`` [experts, hidden, ffn], router ``mlp.gate.weight``
-- and converts on load and save. A ``state_dict()`` of such a model, or a file written in the
fused layout, is split here.
"""

from __future__ import annotations

import re

import torch

from ..arch import Arch
from .weights import LAYER, expert_keys, router_key

_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)$")


def per_expert(state: dict[str, torch.Tensor], arch: Arch) -> dict[str, torch.Tensor]:
    """``state`` with every fused expert tensor split into the per-expert canonical names
    (tensors already per expert pass through)."""
    if not arch.is_moe:
        return state
    out = {}
    for k, v in state.items():
        m = _FUSED.match(k)
        if m is None:
            out[k] = v
            continue
        p, what = LAYER.format(m.group(1)), m.group(2)
        if what == "gate.weight":
            out[p + router_key(arch)] = v
            continue
        for j in range(arch.num_experts):
            gate, up, down = (p + x for x in expert_keys(arch, j))
            if what == "experts.down_proj":
                out[down] = v[j].contiguous()
            else:
                g, u = v[j].chunk(2, dim=0)
                out[gate], out[up] = g.contiguous(), u.contiguous()
    return out

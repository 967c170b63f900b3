"""From importance scores and targets to a :class:`~.plan.Plan` (what to keep on every axis).

Width (Minitron §2): hidden channels by their summed norm-output importance; per layer, MLP neurons
by their own scores, query groups by the summed importance of their heads, then the best heads
inside each kept group (the same count per group, so GQA stays valid). Depth: drop the layers with
the lowest Block Importance, either as one contiguous block (the minimum-sum window, as the
paper's depth study removes contiguous blocks) or scattered; or an explicit list. Mixture of
experts: per layer the highest-scoring experts (:func:`~..importance.scores.expert_scores`), and
one set of neurons for all of a layer's experts by their scores aggregated over experts, and the
shared expert's neurons (if any) by their own scores, like a dense MLP's.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..arch import Arch
from ..importance.reduce import Importance
from ..importance.scores import group_scores
from .plan import Plan, top_k
from ..config.targets import Targets


def select_layers(block: torch.Tensor, keep: int, contiguous: bool = True) -> list[int]:
    """Layers to keep given per-layer importance; drops ``len(block) - keep`` of them."""
    n = block.numel()
    drop = n - keep
    if drop <= 0:
        return list(range(n))
    if not contiguous:
        return top_k(block, keep)
    sums = [float(block[s:s + drop].sum()) for s in range(n - drop + 1)]
    start = min(range(len(sums)), key=lambda s: (sums[s], s))
    return [i for i in range(n) if not start <= i < start + drop]


def random_importance(arch: Arch, seed: int) -> Importance:
    """Random scores of the right shapes: the ablation baseline for activation importance."""
    g = torch.Generator().manual_seed(seed)
    L = arch.num_layers
    imp = Importance(torch.rand(L, arch.ffn_hidden_size, generator=g),
                     torch.rand(L, arch.num_attention_heads, generator=g),
                     torch.rand(arch.hidden_size, generator=g), torch.rand(L, generator=g),
                     {"random_seed": seed})
    if arch.is_moe:
        imp.experts = torch.rand(L, arch.num_experts, generator=g)
    if arch.has_shared_expert:
        imp.shared_ffn = torch.rand(L, arch.moe_shared_expert_intermediate_size, generator=g)
    return imp


def _per_layer(scores: Optional[torch.Tensor], what: str, layers: list[int], keep: int) -> list:
    """The ``keep`` best indices of every kept layer by an MoE axis's [layers, n] scores."""
    if scores is None:
        raise ValueError(f"these importance scores have no {what} scores (computed before this "
                         "axis was supported, or for another model); calibrate again")
    return [top_k(scores[i], keep) for i in layers]


def make_plan(arch: Arch, imp: Importance, targets: Targets, *, keep_layers: Optional[Sequence[int]] = None,
              contiguous: bool = True) -> Plan:
    tgt = targets.resolve(arch)
    if keep_layers is not None:
        layers = sorted(set(int(i) for i in keep_layers))
        if not layers or layers[0] < 0 or layers[-1] >= arch.num_layers:
            raise ValueError(f"layers to keep {list(keep_layers)} must lie in [0, {arch.num_layers})")
    else:
        layers = select_layers(imp.block, tgt.num_layers, contiguous)
    hidden = top_k(imp.hidden, tgt.hidden_size)
    hpg_src, hpg = arch.heads_per_group, tgt.num_attention_heads // tgt.num_query_groups
    ffn, groups, heads = [], [], []
    for i in layers:
        ffn.append(top_k(imp.ffn[i], tgt.ffn_hidden_size))
        g = top_k(group_scores(imp.heads[i], arch.num_query_groups), tgt.num_query_groups)
        groups.append(g)
        kept = []
        for gi in g:
            local = top_k(imp.heads[i][gi * hpg_src:(gi + 1) * hpg_src], hpg)
            kept += [gi * hpg_src + h for h in local]
        heads.append(kept)
    experts = _per_layer(imp.experts, "expert", layers, tgt.num_experts) if arch.is_moe else []
    shared = _per_layer(imp.shared_ffn, "shared-expert", layers,
                        tgt.moe_shared_expert_intermediate_size) if arch.has_shared_expert else []
    meta = {"importance": imp.meta, "contiguous": contiguous,
            "dropped_layers": [i for i in range(arch.num_layers) if i not in layers]}
    return Plan(arch, hidden, ffn, groups, heads, layers, meta, experts, shared)

"""Candidate architectures around a parameter budget (Minitron §3.3).

Every axis the search may change gets a list of allowed values: explicit, or the multiples of a
step between a shrink limit and the source size. The attention axis is searched as (heads, query
groups) pairs that keep GQA valid (the same number of heads in every kept group, at most the
source's heads per group). The product of the axes is filtered by the layout (TP must divide heads,
groups and FFN; PP the layers) and by a band around the budget, measured with the analytic count
:meth:`~nemo_minitron.arch.Arch.num_params`. When more candidates survive than may be trained, the
ones nearest the budget are taken round-robin over depths, so deep-narrow and shallow-wide shapes
are both tried rather than ten neighbours of one shape. A mixture-of-experts source adds the
experts per layer as an axis (``ffn_hidden_size`` is then each expert's width), one with a shared
expert (Qwen2-MoE) its width (``moe_shared_expert_intermediate_size``: every token passes through
it, so it weighs on active parameters as much as a dense FFN), and the budget may count total
parameters or the active ones a token passes through (``count="active"``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional

from ..arch import Arch
from ..config.schema import SearchConfig
from ..config.targets import Targets

Space = SearchConfig
"""The space is the search settings themselves (budget, tolerance, count, axes, explicit values,
steps, shrink limits), validated once when they are built."""


@dataclass
class Candidate:
    index: int
    target: Targets
    params: int
    non_embedding: int

    active: Optional[int] = None
    """Parameters a token passes through (MoE), None for a dense model."""

    def name(self) -> str:
        t = self.target
        experts = f"-E{t.num_experts}" if t.num_experts is not None else ""
        shared = t.moe_shared_expert_intermediate_size
        return (f"L{t.num_layers}-H{t.hidden_size}-F{t.ffn_hidden_size}-"
                f"A{t.num_attention_heads}g{t.num_query_groups}{experts}"
                f"{f'-S{shared}' if shared is not None else ''}")

    def to_dict(self) -> dict:
        out = {"index": self.index, "name": self.name(), "target": self.target.as_dict(),
               "params": self.params, "non_embedding": self.non_embedding}
        if self.active is not None:
            out["active"] = self.active
        return out


def counted(arch: Arch, space: Space) -> int:
    """The parameters the budget is measured in."""
    if space.count == "active":
        return arch.num_active_params(embeddings=space.count_embeddings)
    return arch.num_params(embeddings=space.count_embeddings)


def budget_params(src: Arch, space: Space) -> int:
    total = counted(src, space)
    if space.budget is None:
        raise ValueError("search.budget is required: a fraction of the source's parameters "
                         "(<= 1, e.g. 0.6) or a parameter count (e.g. 4.5e9)")
    target = space.budget * total if space.budget <= 1 else space.budget
    if target > total:
        raise ValueError(f"search.budget={space.budget:g} asks for {target:.4g} parameters but the "
                         f"source has {total:.4g}{'' if space.count_embeddings else ' non-embedding'}")
    return int(round(target))


def _multiples(src: int, step: int, low_fraction: float) -> list[int]:
    lo = max(1, math.ceil(src * low_fraction))
    vals = {v for v in range(step, src + 1, step) if v >= lo}
    vals.add(src)
    return sorted(vals)


def _explicit(name: str, values, src: int) -> list[int]:
    bad = [v for v in values if not 0 < int(v) <= src]
    if bad:
        raise ValueError(f"search.{name}={list(values)}: {bad} outside [1, {src}] (the source has "
                         f"{src}); pruning cannot grow a model")
    return sorted({int(v) for v in values})


def _expert_values(src: Arch, space: Space) -> list[int]:
    """Experts per layer to try: the source's alone for a dense model or a fixed axis."""
    E, k = src.num_experts, src.moe_top_k
    if not src.is_moe or "num_experts" not in space.axes:
        return [E]
    if space.num_experts is not None:
        vals = _explicit("num_experts", space.num_experts, E)
        if vals[0] < k:
            raise ValueError(f"search.num_experts={list(space.num_experts)}: every token is "
                             f"routed to moe_top_k={k} experts; keep at least {k}")
        return vals
    lo = max(k, math.ceil(E * space.min_fraction.get("num_experts", 0.0)))
    return [e for e in _multiples(E, max(1, E // 8), 0.0) if e >= lo]


def _shared_absent(src: Arch, space: Space) -> bool:
    """True when the source has no shared expert (its width axis then stays 0); explicit widths
    for such a source are refused."""
    if src.has_shared_expert:
        return False
    if space.moe_shared_expert_intermediate_size is not None:
        raise ValueError(f"search.moe_shared_expert_intermediate_size="
                         f"{list(space.moe_shared_expert_intermediate_size)}: the source model "
                         "has no shared expert; leave it unset")
    return True


def axis_values(src: Arch, space: Space) -> dict[str, list]:
    """Allowed values of every axis; attention as (heads, groups) pairs."""
    mf = space.min_fraction
    out = {}
    shared = "moe_shared_expert_intermediate_size"
    for name, step in (("num_layers", space.layer_step), ("hidden_size", space.hidden_multiple),
                       ("ffn_hidden_size", space.ffn_multiple), (shared, space.ffn_multiple)):
        s = getattr(src, name)
        if name not in space.axes or (name == shared and _shared_absent(src, space)):
            out[name] = [s]
        elif getattr(space, name) is not None:
            out[name] = _explicit(name, getattr(space, name), s)
        else:
            out[name] = _multiples(s, step, mf.get(name, 0.0))
    out["num_experts"] = _expert_values(src, space)
    H, G, hpg = src.num_attention_heads, src.num_query_groups, src.heads_per_group
    if "attention" not in space.axes:
        out["attention"] = [(H, G)]
        return out
    heads = (_explicit("num_attention_heads", space.num_attention_heads, H)
             if space.num_attention_heads is not None
             else [h for h in range(1, H + 1) if h >= math.ceil(H * mf.get("num_attention_heads", 0.0))])
    groups = (_explicit("num_query_groups", space.num_query_groups, G)
              if space.num_query_groups is not None else list(range(1, G + 1)))
    out["attention"] = [(h, g) for h in heads for g in groups if h % g == 0 and h // g <= hpg]
    if not out["attention"]:
        raise ValueError(f"no (heads, query groups) pair in heads={heads} x groups={groups} keeps "
                         f"GQA valid (at most {hpg} heads per group)")
    return out


def enumerate_candidates(src: Arch, space: Space, tp: int = 1, pp: int = 1,
                         ep: int = 1) -> list[Candidate]:
    """Every feasible architecture within the band, nearest the budget first."""
    budget = budget_params(src, space)
    lo, hi = budget * (1 - space.tolerance), budget * (1 + space.tolerance)
    vals = axis_values(src, space)
    found = []
    for combo in itertools.product(*vals.values()):
        arch = _arch_at(src, dict(zip(vals, combo)))
        if arch == src:  # keeps every size: not a compression (a budget near 1 would offer it)
            continue
        try:
            arch.check_parallel(tp, pp, ep)
        except ValueError:
            continue
        n = counted(arch, space)
        if lo <= n <= hi:
            found.append((abs(n - budget), arch))
    found.sort(key=lambda x: (x[0], -x[1].num_layers, -x[1].hidden_size))
    return [Candidate(i, Targets.of(a), a.num_params(), a.num_params(embeddings=False),
                      a.num_active_params() if a.is_moe else None)
            for i, (_, a) in enumerate(found)]


def _arch_at(src: Arch, point: dict) -> Arch:
    """``src`` with one value of every axis (:func:`axis_values`' keys)."""
    sizes = dict(point)
    heads, groups = sizes.pop("attention")
    return src.replace(num_attention_heads=heads, num_query_groups=groups, **sizes)


def select(candidates: list[Candidate], k: int) -> list[Candidate]:
    """At most ``k`` candidates: nearest the budget, taken round-robin over depths (the depth
    with the nearest candidate first), so every depth in the band is represented before any
    depth gets a second shape."""
    by_depth: dict[int, list[Candidate]] = {}
    for c in candidates:  # already nearest-first
        by_depth.setdefault(c.target.num_layers, []).append(c)
    queues = sorted(by_depth.values(), key=lambda q: q[0].index)
    out: list[Candidate] = []
    while len(out) < k and any(queues):
        for q in queues:
            if q and len(out) < k:
                out.append(q.pop(0))
    return sorted(out, key=lambda c: c.index)


def describe_empty(src: Arch, space: Space, tp: int, pp: int) -> str:
    """Why no candidate fits: the smallest and largest counts the axes can reach."""
    vals = axis_values(src, space)
    small = _arch_at(src, {k: min(v) for k, v in vals.items()})
    n_small = counted(small, space)
    budget = budget_params(src, space)
    if budget * (1 + space.tolerance) >= counted(src, space):  # only the model itself fits
        return (f"the budget ({budget / 1e6:.2f}M parameters, \u00b1{space.tolerance:.0%}) keeps "
                f"the whole model ({counted(src, space) / 1e6:.2f}M): nothing to prune; give a "
                "smaller budget (e.g. 0.6 of the model)")
    return (f"no candidate architecture within {space.tolerance:.0%} of {budget / 1e6:.2f}M "
            f"parameters at tp={tp}, pp={pp}: the axes reach down to {n_small / 1e6:.2f}M and up to "
            f"{counted(src, space) / 1e6:.2f}M; widen "
            "search.tolerance, lower the shrink limits (search.min_fraction) or use finer steps")

"""A pruning plan: which indices survive on every axis, and the architecture that results.

Plans are plain data (JSON): made from importance scores and targets (:func:`make_plan`), saved next
to the pruned checkpoint, and applied by :mod:`.apply`. Indices are into the *source* model and
sorted ascending, so applying a plan keeps the original order of what remains.

Axes:
  hidden   embedding channels (0..hidden_size-1): one set, the residual stream is shared
  layers   transformer layers kept
  ffn      MLP neurons kept, per kept layer (same count in every layer)
  groups   query groups (KV heads) kept, per kept layer
  heads    attention heads kept, per kept layer (global head ids of the source layer; the same
           count in every kept group, so GQA stays valid)
  experts  MoE experts kept, per kept layer (router rows and the experts' weights go together;
           at least ``moe_top_k``); ``ffn`` then keeps the same neurons in every kept expert
  shared_ffn  the shared expert's neurons kept, per kept layer (MoE with a shared expert)
Per-layer axes may be given as one flat list, meaning the same indices in every kept layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..arch import Arch
from ..artifacts.atomic import write_json


PER_LAYER = ("ffn", "groups", "heads")
OPTIONAL_PER_LAYER = ("experts", "shared_ffn")
"""Per-layer axes of MoE models only; empty for a model without them."""


@dataclass
class Plan:
    source: Arch
    hidden: list[int]
    ffn: list[list[int]]
    groups: list[list[int]]
    heads: list[list[int]]
    layers: list[int]
    meta: dict = field(default_factory=dict)
    experts: list = field(default_factory=list)
    shared_ffn: list = field(default_factory=list)

    def __post_init__(self):
        s = self.source
        if s.is_moe and not self.experts:
            self.experts = list(range(s.num_experts))
        if s.has_shared_expert and not self.shared_ffn:
            self.shared_ffn = list(range(s.moe_shared_expert_intermediate_size))
        for name in PER_LAYER + OPTIONAL_PER_LAYER:
            v = getattr(self, name)
            if v or name in PER_LAYER:  # a flat list: the same indices in every kept layer
                flat = not v or not isinstance(v[0], (list, tuple))
                setattr(self, name, [list(v) for _ in self.layers] if flat else [list(x) for x in v])
        self.validate()

    @property
    def target(self) -> Arch:
        s = self.source
        moe = {"num_experts": len(self.experts[0])} if s.is_moe else {}
        if s.has_shared_expert:
            moe["moe_shared_expert_intermediate_size"] = len(self.shared_ffn[0])
        return s.replace(num_layers=len(self.layers), hidden_size=len(self.hidden),
                         ffn_hidden_size=len(self.ffn[0]), num_attention_heads=len(self.heads[0]),
                         num_query_groups=len(self.groups[0]), **moe)

    def layer_experts(self, source_layer: int) -> list[int]:
        """Experts kept in ``source_layer`` (MoE only)."""
        return self.experts[self.layers.index(source_layer)]

    def layer_shared(self, source_layer: int) -> list[int]:
        """Shared-expert neurons kept in ``source_layer`` (MoE with a shared expert only)."""
        return self.shared_ffn[self.layers.index(source_layer)]

    def layer_keep(self, source_layer: int) -> tuple[list[int], list[int], list[int]]:
        """(ffn, groups, heads) kept in ``source_layer``."""
        pos = self.layers.index(source_layer)
        return self.ffn[pos], self.groups[pos], self.heads[pos]

    def validate(self) -> None:
        s = self.source

        def check(name, idx, n):
            if not idx:
                raise ValueError(f"plan keeps no {name}")
            if list(idx) != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= n:
                raise ValueError(f"plan.{name} must be sorted unique indices in [0, {n})")

        check("hidden", self.hidden, s.hidden_size)
        check("layers", self.layers, s.num_layers)
        for name in PER_LAYER:
            per = getattr(self, name)
            if len(per) != len(self.layers):
                raise ValueError(f"plan.{name} has {len(per)} entries for {len(self.layers)} kept layers")
            if len({len(x) for x in per}) != 1:
                raise ValueError(f"plan.{name} keeps a different count in different layers; "
                                 "megatron-core layers must be uniform")
        self._validate_moe_axes()
        hpg = s.heads_per_group
        for pos, (ffn, groups, heads) in enumerate(zip(self.ffn, self.groups, self.heads)):
            check("ffn", ffn, s.ffn_hidden_size)
            check("groups", groups, s.num_query_groups)
            check("heads", heads, s.num_attention_heads)
            per_group = {g: [h for h in heads if h // hpg == g] for g in groups}
            if sum(len(v) for v in per_group.values()) != len(heads):
                raise ValueError(f"plan keeps heads of query groups it removes (layer {self.layers[pos]})")
            if len({len(v) for v in per_group.values()}) != 1:
                raise ValueError(f"plan keeps an unequal number of heads per query group: {per_group}")

    def _validate_moe_axes(self) -> None:
        s = self.source
        for name, present, n, what in (
                ("experts", s.is_moe, s.num_experts, "experts"),
                ("shared_ffn", s.has_shared_expert, s.moe_shared_expert_intermediate_size,
                 "a shared expert")):
            if present:
                self._check_uniform(name, getattr(self, name), n)
            elif getattr(self, name):
                raise ValueError(f"plan.{name} given for a model without {what}")
        if s.is_moe and len(self.experts[0]) < s.moe_top_k:
            raise ValueError(f"plan keeps {len(self.experts[0])} experts per layer but tokens are "
                             f"routed to moe_top_k={s.moe_top_k}; keep at least that many")

    def _check_uniform(self, name: str, per: list, n: int) -> None:
        """``per``: one sorted index list in [0, n) per kept layer, the same count in each."""
        if len(per) != len(self.layers):
            raise ValueError(f"plan.{name} has {len(per)} entries for {len(self.layers)} kept layers")
        for kept in per:
            if not kept or list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= n:
                raise ValueError(f"plan.{name} must be sorted unique indices in [0, {n})")
            if len(kept) != len(per[0]):
                raise ValueError(f"plan.{name} keeps a different count in different layers; "
                                 "megatron-core layers must be uniform")

    # ------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict:
        keep = {"hidden": self.hidden, "ffn": self.ffn, "groups": self.groups,
                "heads": self.heads, "layers": self.layers}
        if self.experts:
            keep["experts"] = self.experts
        if self.shared_ffn:
            keep["shared_ffn"] = self.shared_ffn
        return {"source": self.source.to_dict(), "target": self.target.to_dict(),
                "keep": keep, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        k = d["keep"]
        return cls(Arch.from_dict(d["source"]), k["hidden"], k["ffn"], k["groups"], k["heads"],
                   k["layers"], d.get("meta", {}), k.get("experts", []), k.get("shared_ffn", []))

    def save(self, path) -> None:
        write_json(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path) -> "Plan":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def identity_plan(arch: Arch) -> Plan:
    return Plan(arch, list(range(arch.hidden_size)), list(range(arch.ffn_hidden_size)),
                list(range(arch.num_query_groups)), list(range(arch.num_attention_heads)),
                list(range(arch.num_layers)), experts=list(range(arch.num_experts)),
                shared_ffn=list(range(arch.moe_shared_expert_intermediate_size)))


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, ascending (ties broken by lower index)."""
    if not 0 < k <= scores.numel():
        raise ValueError(f"cannot keep {k} of {scores.numel()}")
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])

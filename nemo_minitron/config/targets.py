"""What a pruned model keeps: the one representation of prune targets.

The same dataclass is the ``prune.target`` / ``pipeline.rounds[].target`` config group, what
:func:`~nemo_minitron.pruning.select.make_plan` resolves against the source architecture, and a
search candidate's architecture; only ``candidates.json`` and ``chosen.json`` hold it as a plain
dict (:meth:`as_dict`). Torch-free and in ``config/``, so the schema uses it without importing
pruning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterator, Optional

from ..arch import Arch

# the Arch fields a target may shrink; every one must lie in [1, source]
_SIZES = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "num_layers")


@dataclass
class Targets(Mapping):
    """Sizes to keep, None for "as the source"; read as a mapping it holds the set ones, the dict
    that candidates.json stores (``arch.replace(**targets)``, ``targets["num_layers"]``)."""

    hidden_size: Optional[int] = None
    """Embedding channels to keep (None: keep all)."""
    ffn_hidden_size: Optional[int] = None
    """MLP neurons per layer to keep."""
    num_attention_heads: Optional[int] = None
    """Attention heads to keep (pruned uniformly within query groups)."""
    num_query_groups: Optional[int] = None
    """Query groups (KV heads) to keep."""
    num_layers: Optional[int] = None
    """Layers to keep (depth pruning); see prune.depth."""
    num_experts: Optional[int] = None
    """MoE experts per layer to keep (at least the model's moe_top_k); ffn_hidden_size is then
    each expert's width."""
    moe_shared_expert_intermediate_size: Optional[int] = None
    """Neurons of the MoE layers' shared expert to keep (Qwen2-MoE)."""

    @classmethod
    def of(cls, arch: Arch) -> "Targets":
        """Every size of ``arch`` (the experts, and the shared expert's width, only for a
        mixture-of-experts model that has them)."""
        shared = arch.moe_shared_expert_intermediate_size
        return cls(**{k: getattr(arch, k) for k in _SIZES},
                   num_experts=arch.num_experts if arch.is_moe else None,
                   moe_shared_expert_intermediate_size=shared if shared else None)

    def as_dict(self) -> dict:
        """The set fields, as candidates.json and chosen.json store them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    def __getitem__(self, name: str) -> int:
        value = getattr(self, name, None) if isinstance(name, str) else None
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())

    def resolve(self, arch: Arch) -> Arch:
        """The target architecture; raises naming the field when a target is impossible."""
        out = {}
        if self.num_experts is not None:
            if not arch.is_moe:
                raise ValueError(f"prune.target.num_experts={self.num_experts}: the source model "
                                 "has no experts; leave it unset")
            if not arch.moe_top_k <= self.num_experts <= arch.num_experts:
                raise ValueError(
                    f"prune.target.num_experts={self.num_experts} must be in [moe_top_k="
                    f"{arch.moe_top_k}, {arch.num_experts}]: every token is routed to "
                    f"{arch.moe_top_k} experts, and pruning cannot add experts")
            out["num_experts"] = self.num_experts
        out.update(self._resolve_shared(arch))
        for name in _SIZES:
            src, tgt = getattr(arch, name), getattr(self, name)
            tgt = src if tgt is None else tgt
            if not 0 < tgt <= src:
                raise ValueError(f"prune.target.{name}={tgt} must be in [1, {src}] (the source "
                                 f"model has {src}); pruning cannot grow a model")
            out[name] = tgt
        heads, groups = out["num_attention_heads"], out["num_query_groups"]
        if heads % groups:
            raise ValueError(f"prune.target.num_attention_heads={heads} is not a multiple of "
                             f"prune.target.num_query_groups={groups}")
        if heads // groups > arch.heads_per_group:
            raise ValueError(
                f"{heads} heads in {groups} query groups needs {heads // groups} heads per group, "
                f"but the source has {arch.heads_per_group}: keep more groups "
                f"(num_query_groups >= {-(-heads // arch.heads_per_group)}) or fewer heads")
        return arch.replace(**out)

    def _resolve_shared(self, arch: Arch) -> dict:
        want, src = self.moe_shared_expert_intermediate_size, arch.moe_shared_expert_intermediate_size
        if want is None:
            return {}
        if not src:
            raise ValueError(f"prune.target.moe_shared_expert_intermediate_size={want}: the source "
                             "model has no shared expert; leave it unset")
        if not 0 < want <= src:
            raise ValueError(f"prune.target.moe_shared_expert_intermediate_size={want} must be in "
                             f"[1, {src}] (the source's shared expert width); pruning cannot grow "
                             "a model")
        return {"moe_shared_expert_intermediate_size": want}

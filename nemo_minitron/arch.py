"""The architecture of a decoder-only transformer: the one description every stage agrees on.

An :class:`Arch` is what a checkpoint directory records in ``arch.json``, what the runtime builds a
megatron-core ``GPTModel`` from, what pruning changes and what export turns back into a Hugging Face
config. ``head_dim`` is explicit because pruned models keep their head size while hidden shrinks.
Which combinations of norm, MLP, biases and QK-norm exist is the families table (:mod:`.families`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from .artifacts.atomic import write_json
from .families import FAMILIES, MLPS, NORMS

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


@dataclass
class Arch:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    model_type: str = "llama"
    extra: dict = field(default_factory=dict)
    qk_norm: bool = False
    """RMSNorm over head_dim on queries and keys (Qwen3); one weight per head_dim, shared by heads."""
    norm: str = "rmsnorm"
    """rmsnorm, or layernorm1p: LayerNorm with bias and zero-centred weight (Nemotron)."""
    mlp: str = "swiglu"
    """swiglu (gate/up/down) or relu2: non-gated squared ReLU (up/down, Nemotron)."""
    rotary_fraction: float = 1.0
    """Fraction of each head's dims that RoPE rotates (Nemotron's partial_rotary_factor)."""
    num_experts: int = 0
    """Routed experts in every layer's MLP (Mixtral, Qwen3-MoE); 0: a dense MLP. With experts,
    ``ffn_hidden_size`` is the width of each expert (Mixtral's intermediate_size, Qwen3-MoE's
    moe_intermediate_size), the same for all experts."""
    moe_top_k: int = 0
    """Experts each token is sent to: the k largest of the softmax over all experts."""
    moe_renorm: bool = False
    """The k routing weights are rescaled to sum to one (Mixtral; Qwen3-MoE's norm_topk_prob)."""
    moe_shared_expert_intermediate_size: int = 0
    """Width of the one shared expert every MoE layer adds for every token, its output scaled by
    a per-token sigmoid gate (Qwen2-MoE's shared_expert_intermediate_size); 0: none."""
    sliding_window: Optional[int] = None
    """Each token attends to itself and the ``sliding_window - 1`` tokens before it, in every
    layer (Mistral-7B-v0.1, Phi-3-mini-4k); None: to every earlier token."""

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "head_dim", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"arch.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"arch.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"arch.num_query_groups={self.num_query_groups}: every query group needs the same "
                "number of heads; choose num_query_groups that divides num_attention_heads")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"arch.model_type={self.model_type!r} is not supported; "
                             f"use one of {SUPPORTED_MODEL_TYPES}")
        if self.norm not in NORMS:
            raise ValueError(f"arch.norm={self.norm!r} is unknown; use one of {tuple(NORMS)}")
        if self.mlp not in MLPS:
            raise ValueError(f"arch.mlp={self.mlp!r} is unknown; use one of {tuple(MLPS)}")
        rot = self.head_dim * self.rotary_fraction
        if not 0 < self.rotary_fraction <= 1 or rot != int(rot) or int(rot) % 2:
            raise ValueError(f"arch.rotary_fraction={self.rotary_fraction} must be in (0, 1] and "
                             f"rotate an even number of head_dim={self.head_dim} dims")
        fam = FAMILIES[self.model_type]
        if fam.features() != (self.norm, self.mlp, self.qkv_bias, self.qk_norm, self.is_moe,
                              self.has_shared_expert):
            raise ValueError(
                f"arch.model_type={self.model_type!r} has norm={fam.norm}, mlp={fam.mlp}, "
                f"qkv_bias={fam.qkv_bias}, qk_norm={fam.qk_norm}, experts={fam.moe}, shared "
                f"expert={fam.shared_expert}, but the arch says norm={self.norm}, mlp={self.mlp}, "
                f"qkv_bias={self.qkv_bias}, qk_norm={self.qk_norm}, num_experts={self.num_experts}"
                f", moe_shared_expert_intermediate_size={self.moe_shared_expert_intermediate_size}"
                "; set the fields as the family has them (nemo_minitron/families.py)")
        if self.is_moe:
            self._validate_moe(fam)
        if self.sliding_window is not None and (
                not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"arch.sliding_window={self.sliding_window!r} must be a positive "
                             "number of tokens, or null for full attention")
        if self.sliding_window is not None and not fam.sliding_window:
            raise ValueError(f"arch.sliding_window={self.sliding_window}: {self.model_type} "
                             "attends to every earlier token; set sliding_window=null")
        if self.rotary_fraction != 1.0 and not fam.partial_rotary:
            raise ValueError(f"arch.rotary_fraction={self.rotary_fraction}: {self.model_type} "
                             "rotates whole heads; set rotary_fraction=1.0")
        kind = None if self.rope_scaling is None else self.rope_scaling.get("rope_type")
        if kind not in (None, "llama3", "longrope"):
            raise ValueError(f"rope_scaling {self.rope_scaling} is not supported; only rope_type "
                             "'llama3' (Llama 3.1) and 'longrope' (Phi-3) scaling are implemented")
        if kind == "longrope":
            self._validate_longrope()

    def _validate_longrope(self) -> None:
        rs, half = self.rope_scaling, int(self.head_dim * self.rotary_fraction) // 2
        for name in ("short_factor", "long_factor"):
            if not isinstance(rs.get(name), list) or len(rs[name]) != half:
                raise ValueError(f"rope_scaling.{name} must list one factor per rotated pair of "
                                 f"dims ({half}), got {rs.get(name)!r:.80}")
        if not isinstance(rs.get("original_max_position_embeddings"), int):
            raise ValueError("rope_scaling (longrope) needs original_max_position_embeddings, the "
                             "pretraining context its short factors are for")

    @property
    def longrope_context(self) -> int | None:
        """The longest sequence LongRoPE's short factors apply to (beyond it the long ones, as
        Hugging Face switches per forward); None without LongRoPE."""
        rs = self.rope_scaling
        if not rs or rs.get("rope_type") != "longrope":
            return None
        return int(rs["original_max_position_embeddings"])

    @property
    def rope_attention_factor(self) -> float:
        """What LongRoPE multiplies the rotated dims' cos/sin by (as Hugging Face computes it:
        the config's attention_factor, else sqrt(1 + ln(factor) / ln(original context)) with
        factor the context's growth); 1 otherwise."""
        ctx = self.longrope_context
        if ctx is None:
            return 1.0
        if self.rope_scaling.get("attention_factor") is not None:
            return float(self.rope_scaling["attention_factor"])
        factor = self.rope_scaling.get("factor") or self.max_position_embeddings / ctx
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(ctx))

    def _validate_moe(self, fam) -> None:
        if not 0 < self.moe_top_k <= self.num_experts:
            raise ValueError(f"arch.moe_top_k={self.moe_top_k} must be in [1, num_experts="
                             f"{self.num_experts}]: a token cannot use more experts than there "
                             "are; keep at least moe_top_k experts or lower moe_top_k")
        if fam.moe_renorm is not None and self.moe_renorm != fam.moe_renorm:
            raise ValueError(f"arch.moe_renorm={self.moe_renorm}: {self.model_type} always has "
                             f"moe_renorm={fam.moe_renorm}")
        if self.moe_renorm and self.moe_top_k == 1:
            # megatron-core's softmax router renormalises only by selecting before the softmax,
            # which it refuses for k=1 (a one-way softmax has no gradient)
            raise ValueError("arch.moe_top_k=1 with moe_renorm=true is not supported (every "
                             "token's single weight would be 1); use moe_top_k >= 2")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def has_shared_expert(self) -> bool:
        return self.moe_shared_expert_intermediate_size > 0

    def check_parallel(self, tp: int, pp: int, ep: int = 1) -> None:
        """Raise if this architecture cannot be laid out over ``tp`` x ``pp`` (x ``ep``) ranks."""
        if ep > 1 and not self.is_moe:
            raise ValueError(f"parallel.ep={ep} needs a mixture-of-experts model; set parallel.ep=1")
        if self.is_moe and self.num_experts % ep:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by parallel.ep={ep}; "
                             "pick an ep that divides it")
        if self.num_attention_heads % tp:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"parallel.tp={tp}; pick a tp that divides it")
        if self.num_query_groups % tp:
            raise ValueError(f"num_query_groups={self.num_query_groups} is not divisible by "
                             f"parallel.tp={tp}; pick a tp that divides it")
        for name in ("ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            if getattr(self, name) % tp:
                raise ValueError(f"{name}={getattr(self, name)} is not divisible by "
                                 f"parallel.tp={tp}; pick a tp that divides it")
        if self.num_layers % pp:
            raise ValueError(f"num_layers={self.num_layers} is not divisible by parallel.pp={pp}; "
                             "pick a pp that divides it")

    # ------------------------------------------------------------------ counts
    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def padded_vocab_size(self, tp: int, multiple: int = 128) -> int:
        """Vocabulary rows actually allocated: a multiple of ``multiple * tp`` unless already divisible."""
        if self.vocab_size % tp == 0:
            return self.vocab_size
        step = multiple * tp
        return ((self.vocab_size + step - 1) // step) * step

    def num_params(self, embeddings: bool = True) -> int:
        """Analytic parameter count (biases included, rotary buffers excluded)."""
        return self._count(self.num_experts, embeddings)

    def num_active_params(self, embeddings: bool = True) -> int:
        """Parameters one token passes through: the router, ``moe_top_k`` experts and the shared
        expert (with its gate) of each layer instead of all experts (= :meth:`num_params` for a
        dense model)."""
        return self._count(self.moe_top_k, embeddings)

    def _count(self, experts: int, embeddings: bool) -> int:
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        attn += 2 * d if self.qk_norm else 0
        mlp = (3 if self.mlp == "swiglu" else 2) * h * self.ffn_hidden_size
        if self.is_moe:  # experts of the same width, plus the router's [experts, hidden]
            mlp = experts * mlp + self.num_experts * h
        if self.has_shared_expert:  # gate/up/down and the gate score's [1, hidden]
            mlp += 3 * h * self.moe_shared_expert_intermediate_size + h
        norm = 2 * h if self.norm == "layernorm1p" else h  # LayerNorm carries a bias
        per_layer = attn + mlp + 2 * norm
        total = self.num_layers * per_layer + norm  # final norm
        if embeddings:
            total += self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return total

    # ------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Arch":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def to_json(self, path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path) -> "Arch":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def replace(self, **changes) -> "Arch":
        return dataclasses.replace(self, **changes)


def check_layout(archs: dict, tp: int, pp: int, ep: int = 1) -> None:
    """``archs`` (job field -> Arch: the models one job builds together, e.g. a student and its
    teacher) laid out over ``tp`` x ``pp`` x ``ep``: every model at tp/pp, the experts of each
    MoE model over ep (a dense model in the same job stays replicated over the expert-parallel
    ranks), and ep > 1 only when some model has experts to split."""
    if ep > 1 and not any(a.is_moe for a in archs.values()):
        raise ValueError(f"parallel.ep={ep} needs a mixture-of-experts model ({', '.join(archs)} "
                         "dense); set parallel.ep=1")
    for name, a in archs.items():
        try:
            a.check_parallel(tp, pp, ep if a.is_moe else 1)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None

"""The model families we read and write: one table that arch, weight maps and HF configs consult.

A family is a Hugging Face ``model_type`` and the pieces of the decoder it fixes. Everything else
(sizes, GQA, RoPE base and scaling, tied embeddings, expert counts and widths) is a free
:class:`~nemo_minitron.arch.Arch` field. Adding a family is a row here, its config class in :mod:`.convert.hf_config`, and a
tiny random model in ``tests/conftest.py``.

=========  =================  ===========  =========  =======  ==============  ================
family     norm               MLP          QKV bias   QK-norm  partial rotary  explicit head_dim
=========  =================  ===========  =========  =======  ==============  ================
llama      RMSNorm            SwiGLU       no         no       no              no (5.x rejects)
mistral    RMSNorm            SwiGLU       no         no       no              yes
qwen2      RMSNorm            SwiGLU       yes        no       no              yes
qwen3      RMSNorm            SwiGLU       no         yes      no              yes
nemotron   LayerNorm1P+bias   squared-ReLU no         no       yes             yes
mixtral    RMSNorm            SwiGLU MoE   no         no       no              yes
qwen3_moe  RMSNorm            SwiGLU MoE   no         yes      no              yes
=========  =================  ===========  =========  =======  ==============  ================

MoE families route every token to ``moe_top_k`` of ``num_experts`` SwiGLU experts in every layer
(softmax over all experts, top-k; Mixtral renormalises the k weights to sum to one, Qwen3-MoE when
its ``norm_topk_prob`` says so). Their checkpoints keep one tensor per expert under the hub's names
(``expert_keys``), which is what ``save_pretrained`` writes and ``from_pretrained`` reads.
Qwen2-MoE adds to every MoE layer one shared expert, a SwiGLU MLP of its own width that every
token passes through, its output scaled by ``sigmoid(shared_expert_gate(x))`` per token
(``shared_keys``); megatron-core's ``SharedExpertMLP`` with ``moe_shared_expert_gate`` is the same.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

NORMS = {"rmsnorm": "RMSNorm", "layernorm1p": "LayerNorm"}
"""Norm -> megatron-core's normalization. rmsnorm: RMSNorm, weight only; layernorm1p: LayerNorm
with bias whose stored weight is zero-centred (the gain applied is weight + 1), Nemotron's
convention (the weight maps fold the + 1 into megatron's plain LayerNorm)."""
MLPS = {"swiglu": "silu", "relu2": "relu2"}
"""MLP -> Hugging Face ``hidden_act``. swiglu: down(silu(gate(x)) * up(x)); relu2:
down(relu(up(x))**2), no gate projection."""


@dataclass(frozen=True)
class Family:
    model_type: str
    """Hugging Face ``config.json`` model_type."""
    causal_lm: str
    """transformers class that loads an export."""
    norm: str = "rmsnorm"
    mlp: str = "swiglu"
    qkv_bias: bool = False
    """Biases on q/k/v only (Qwen2); families whose config would bias o_proj too refuse them."""
    qk_norm: bool = False
    """RMSNorm over head_dim on every query and key head, one weight shared by all heads."""
    partial_rotary: bool = False
    """The config may rotate only a fraction of each head (``partial_rotary_factor``)."""
    explicit_head_dim: bool = True
    """The config class accepts head_dim != hidden_size / num_attention_heads."""
    sliding_window: bool = False
    """The config's ``sliding_window`` applies unless ``use_sliding_window`` says otherwise."""
    hf_fields: tuple = ()
    """(key, value) pairs every exported config of the family sets (no biases, no sliding
    window, no router logits...)."""
    moe: bool = False
    """Every layer's MLP is a mixture of experts behind a softmax top-k router."""
    moe_renorm: bool | None = None
    """Top-k routing weights rescaled to sum to one: always (True), never (False), or as the
    config's ``norm_topk_prob`` says (None)."""
    expert_keys: tuple = ()
    """Per-layer names of (router, expert j's gate, up, down) weights; ``{}`` is j."""
    experts_field: str = "num_experts"
    """The config field of the expert count."""
    expert_width_field: str = "intermediate_size"
    """The config field of each expert's width (Qwen3-MoE's dense intermediate_size builds
    nothing when every layer is MoE)."""
    shared_keys: tuple = ()
    """Per-layer names of the sigmoid-gated shared expert's (gate, up, down, gate-score)
    weights; empty: the family has no shared expert."""
    longrope: bool = False
    """The config may scale RoPE the LongRoPE way (Phi-3's 128k variants); transformers sizes the
    factors by hidden_size / num_attention_heads."""
    fused: bool = False
    """The hub holds q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` (Phi-3;
    :mod:`~nemo_minitron.convert.fused`)."""

    @property
    def shared_expert(self) -> bool:
        return bool(self.shared_keys)

    @property
    def hidden_act(self) -> str:
        return MLPS[self.mlp]

    def config_fields(self) -> dict:
        """A fresh copy of :attr:`hf_fields` (lists in it are not shared between configs)."""
        return copy.deepcopy(dict(self.hf_fields))

    def features(self) -> tuple:
        return (self.norm, self.mlp, self.qkv_bias, self.qk_norm, self.moe, self.shared_expert)


_NO_BIAS = (("attention_bias", False), ("mlp_bias", False))
# every layer is MoE and the exported config asks for no auxiliary loss (output_router_logits)
_ALL_MOE = (("decoder_sparse_step", 1), ("mlp_only_layers", []), ("output_router_logits", False))
_QWEN_EXPERTS = ("mlp.gate.weight", "mlp.experts.{}.gate_proj.weight",
                 "mlp.experts.{}.up_proj.weight", "mlp.experts.{}.down_proj.weight")


FAMILIES = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", explicit_head_dim=False, hf_fields=_NO_BIAS),
    Family("mistral", "MistralForCausalLM", sliding_window=True,
           hf_fields=(("sliding_window", None),)),
    Family("phi3", "Phi3ForCausalLM", partial_rotary=True, sliding_window=True, fused=True,
           longrope=True,
           hf_fields=(("sliding_window", None),)),
    Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, hf_fields=(("use_sliding_window", False),)),
    Family("qwen3", "Qwen3ForCausalLM", qk_norm=True,
           hf_fields=(("use_sliding_window", False), ("attention_bias", False))),
    Family("nemotron", "NemotronForCausalLM", norm="layernorm1p", mlp="relu2", partial_rotary=True,
           hf_fields=_NO_BIAS),
    Family("mixtral", "MixtralForCausalLM", moe=True, moe_renorm=True, sliding_window=True,
           experts_field="num_local_experts",
           hf_fields=(("sliding_window", None), ("output_router_logits", False)), expert_keys=(
               "block_sparse_moe.gate.weight", "block_sparse_moe.experts.{}.w1.weight",
               "block_sparse_moe.experts.{}.w3.weight", "block_sparse_moe.experts.{}.w2.weight")),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", qk_norm=True, moe=True,
           expert_width_field="moe_intermediate_size",
           hf_fields=(("use_sliding_window", False), ("attention_bias", False), *_ALL_MOE),
           expert_keys=_QWEN_EXPERTS),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", qkv_bias=True, moe=True,
           expert_width_field="moe_intermediate_size",
           hf_fields=(("use_sliding_window", False), ("qkv_bias", True), *_ALL_MOE),
           expert_keys=_QWEN_EXPERTS, shared_keys=(
               "mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight",
               "mlp.shared_expert.down_proj.weight", "mlp.shared_expert_gate.weight")),
)}


def family(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(f"model_type {model_type!r} is not a family this toolkit handles; "
                         f"supported: {', '.join(FAMILIES)}") from None


def export_family(arch) -> Family:
    """The family an export is written as: the arch's own when its config class can express the
    shape, else the first family with the same pieces whose config accepts an explicit head_dim
    (a pruned Llama, hidden != heads * head_dim, loads as Mistral)."""
    own = family(arch.model_type)
    want = (arch.norm, arch.mlp, arch.qkv_bias, arch.qk_norm, arch.is_moe, arch.has_shared_expert)
    square = arch.hidden_size == arch.num_attention_heads * arch.head_dim
    longrope = arch.longrope_context is not None
    if longrope and not square:  # transformers checks the factors against hidden / heads
        raise ValueError(
            f"a LongRoPE model with hidden_size={arch.hidden_size} != num_attention_heads x "
            f"head_dim = {arch.num_attention_heads * arch.head_dim} cannot be written as a "
            "Hugging Face config (transformers sizes its rope factors by hidden_size / "
            "num_attention_heads); prune heads and hidden size together, or keep hidden_size")
    for f in (own, *FAMILIES.values()):
        if f.features() == want and (square or f.explicit_head_dim) and (
                arch.rotary_fraction == 1.0 or f.partial_rotary) and (
                arch.sliding_window is None or f.sliding_window) and (
                not longrope or f.longrope):
            return f
    raise ValueError(f"no Hugging Face family can express {arch.model_type} with "
                     f"norm={arch.norm}, mlp={arch.mlp}, qkv_bias={arch.qkv_bias}, "
                     f"qk_norm={arch.qk_norm}, rotary_fraction={arch.rotary_fraction}, "
                     f"sliding_window={arch.sliding_window}")

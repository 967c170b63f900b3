"""Hugging Face ``config.json`` <-> :class:`~nemo_minitron.arch.Arch`.

Import reads the plain JSON (a dict, or any transformers config via ``to_dict()``), not through
transformers' config classes: stock ``LlamaConfig`` rejects ``hidden_size != heads * head_dim``,
which pruned exports of other tools carry. Features we cannot run are refused with the field.

Export picks the config class that stock ``transformers`` loads without extra code: the model's own
family when its class can express the shape, else one with the same pieces that accepts an
explicit ``head_dim`` (:func:`~nemo_minitron.families.export_family`: a pruned Llama is written as
Mistral, since ``LlamaConfig`` rejects it in transformers 5.x).
"""

from __future__ import annotations

from ..arch import Arch
from ..families import FAMILIES, export_family, family

# transformers is imported where a Hugging Face config is built: it is heavy, and the arch
# mapping itself needs none of it.

_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "vocab_size")
_ROPE_TYPES = ("default", "llama3", "longrope")


def _as_dict(cfg) -> dict:
    if isinstance(cfg, dict):
        return dict(cfg)
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    raise ValueError(f"config.json holds a JSON {type(cfg).__name__}, not an object of settings; "
                     "give the model's own config.json")


def _rope(d: dict) -> tuple[float, dict | None, float]:
    """(theta, scaling or None, rotary fraction) from old (rope_theta/rope_scaling) or new
    (rope_parameters) fields."""
    params = dict(d.get("rope_parameters") or {})
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    fraction = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    scaling = d.get("rope_scaling") or None
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None:
        scaling = {k: v for k, v in dict(scaling).items()
                   if k not in ("rope_theta", "partial_rotary_factor")}
        if "rope_type" not in scaling and "type" in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type") == "su":  # LongRoPE's first name (Phi-3 configs of 2024)
            scaling["rope_type"] = "longrope"
        kind = scaling.get("rope_type", "default")
        if kind == "longrope":  # Phi-3 keeps the pretraining context beside the scaling
            scaling.setdefault("original_max_position_embeddings",
                               d.get("original_max_position_embeddings"))
            scaling = {k: v for k, v in scaling.items() if v is not None}
        if kind not in _ROPE_TYPES:
            raise ValueError(f"rope_scaling rope_type={kind!r} is not supported; supported: "
                             f"{', '.join(_ROPE_TYPES)}")
        if kind == "default":
            scaling = None
    return float(theta), scaling, float(fraction)


def _window(d: dict, fam) -> int | None:
    """The sliding attention window of a config; None where it spans max_position_embeddings
    (no token can see past it) or is off (Qwen's use_sliding_window=false)."""
    window = d.get("sliding_window")
    if not window or not d.get("use_sliding_window", fam.sliding_window):
        return None
    return int(window) if window < d.get("max_position_embeddings", 0) else None


def _refuse_unsupported(d: dict, model_type: str) -> None:
    fam = family(model_type)
    if d.get("quantization_config"):
        method = d["quantization_config"].get("quant_method", "?")
        raise ValueError(f"config quantization_config ({method}) is not supported; import the "
                         "unquantized (bf16/fp32) checkpoint")
    if d.get("mlp_bias"):
        raise ValueError("config mlp_bias=true is not supported (no family we handle has MLP biases)")
    if d.get("attention_bias") and not fam.qkv_bias:
        raise ValueError(f"config attention_bias=true is not supported for {model_type} "
                         "(it biases o_proj too); only Qwen2's q/k/v biases are")
    act = d.get("hidden_act", fam.hidden_act)
    if act != fam.hidden_act:
        raise ValueError(f"config hidden_act={act!r} is not supported for {model_type}; "
                         f"expected {fam.hidden_act!r}")
    window = _window(d, fam)
    if window is not None and not fam.sliding_window:
        raise ValueError(f"config sliding_window={window} attention is not supported for "
                         f"{model_type}; only full attention over max_position_embeddings")
    kinds = set(d.get("layer_types") or [])
    if kinds - {"full_attention", "sliding_attention"} or (
            "sliding_attention" in kinds and (len(kinds) > 1 or window is None)):
        raise ValueError(f"config layer_types={sorted(kinds)}: layers of different attention "
                         "are not supported; every layer must attend alike (all full, or all "
                         "over the same sliding_window)")
    if not fam.partial_rotary and d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config partial_rotary_factor is not supported for {model_type}")
    if fam.moe and (d.get("mlp_only_layers") or d.get("decoder_sparse_step", 1) != 1):
        raise ValueError(f"config mlp_only_layers={d.get('mlp_only_layers')}, decoder_sparse_step="
                         f"{d.get('decoder_sparse_step', 1)}: dense layers between MoE layers are "
                         "not supported; every layer must be MoE (mlp_only_layers=[], step 1)")
    if fam.moe and not fam.shared_expert and d.get("shared_expert_intermediate_size"):
        raise ValueError(f"config shared_expert_intermediate_size: {model_type} has no shared "
                         "expert; remove the field")
    if fam.shared_expert and not d.get("shared_expert_intermediate_size", 0) > 0:
        raise ValueError(f"config shared_expert_intermediate_size="
                         f"{d.get('shared_expert_intermediate_size')}: {model_type} needs a "
                         "positive shared expert width")
    if fam.qkv_bias and d.get("qkv_bias", True) is False:
        raise ValueError(f"config qkv_bias=false is not supported for {model_type}; only "
                         "checkpoints with q/k/v biases (qkv_bias=true) import")


def _moe_fields(d: dict, fam) -> dict:
    """Arch fields of an MoE config; its experts' width becomes ffn_hidden_size."""
    if not fam.moe:
        return {}
    experts = d.get("num_local_experts") or d.get("num_experts")
    if not experts or "num_experts_per_tok" not in d:
        raise ValueError(f"{fam.model_type} config lacks num_local_experts/num_experts or "
                         "num_experts_per_tok")
    renorm = fam.moe_renorm if fam.moe_renorm is not None else bool(d.get("norm_topk_prob", False))
    return dict(num_experts=experts, moe_top_k=d["num_experts_per_tok"], moe_renorm=renorm,
                ffn_hidden_size=d.get("moe_intermediate_size") or d["intermediate_size"],
                moe_shared_expert_intermediate_size=d.get("shared_expert_intermediate_size", 0)
                if fam.shared_expert else 0)


def _moe_config(arch: Arch, fam) -> dict:
    """Config fields of an MoE export under the family's names; the routing renormalisation
    only where the family leaves it to the config (norm_topk_prob)."""
    if not fam.moe:
        return {}
    out = {fam.experts_field: arch.num_experts, "num_experts_per_tok": arch.moe_top_k,
           fam.expert_width_field: arch.ffn_hidden_size}
    if fam.moe_renorm is None:
        out["norm_topk_prob"] = arch.moe_renorm
    if fam.shared_expert:
        out["shared_expert_intermediate_size"] = arch.moe_shared_expert_intermediate_size
    return out


def arch_from_hf_config(cfg) -> Arch:
    """The :class:`Arch` of a Hugging Face config (``config.json`` as a dict, or a config object)."""
    d = _as_dict(cfg)
    model_type = d.get("model_type", "llama")
    fam = family(model_type)
    _refuse_unsupported(d, model_type)
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}; is this a decoder-only LM config?")
    heads = d["num_attention_heads"]
    theta, scaling, fraction = _rope(d)
    if scaling and scaling["rope_type"] == "longrope" and not fam.longrope:
        longrope = [f for f, x in FAMILIES.items() if x.longrope]
        raise ValueError(f"config rope_scaling rope_type='longrope' is supported for "
                         f"{', '.join(longrope)} (Phi-3, Phi-4-mini) only, not {model_type}")
    fields = dict(
        num_layers=d["num_hidden_layers"],
        hidden_size=d["hidden_size"],
        ffn_hidden_size=d["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        vocab_size=d["vocab_size"],
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(d.get("norm_eps", d.get("rms_norm_eps", 1e-6))),  # export needs a float
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=fam.qkv_bias,
        model_type=model_type,
        qk_norm=fam.qk_norm,
        norm=fam.norm,
        mlp=fam.mlp,
        rotary_fraction=fraction,
        sliding_window=_window(d, fam),
    )
    return Arch(**{**fields, **_moe_fields(d, fam)})


def export_model_type(arch: Arch) -> str:
    return export_family(arch).model_type


def hf_config_from_arch(arch: Arch, *, torch_dtype: str = "float32", bos_token_id=None,
                        eos_token_id=None, pad_token_id=None):
    import transformers

    fam = export_family(arch)
    common = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_embeddings,
        hidden_act=fam.hidden_act,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        dtype=torch_dtype,
    )
    rope = {"rope_type": "default", "rope_theta": arch.rope_theta}
    if arch.rope_scaling:
        rope = dict(arch.rope_scaling, rope_theta=arch.rope_theta)
    if fam.partial_rotary:
        rope["partial_rotary_factor"] = arch.rotary_fraction
    if arch.longrope_context is not None:
        common["original_max_position_embeddings"] = arch.longrope_context
    extra = {**fam.config_fields(), **_moe_config(arch, fam)}
    if arch.sliding_window is not None:
        extra["sliding_window"] = arch.sliding_window
    eps = {"norm_eps" if fam.norm == "layernorm1p" else "rms_norm_eps": float(arch.norm_eps)}
    config_class = getattr(transformers, fam.causal_lm.replace("ForCausalLM", "Config"))
    cfg = config_class(**{**common, **eps, **extra}, rope_parameters=rope)
    cfg.architectures = [fam.causal_lm]
    return cfg

"""Hugging Face config <-> :class:`~nemo_minitron.arch.Arch`.

Export picks the config class that stock ``transformers`` loads without extra code: ``LlamaConfig``
when ``hidden_size == heads * head_dim``; otherwise ``MistralConfig`` (Llama-compatible weights, accepts
an explicit ``head_dim``, which ``LlamaConfig`` rejects in transformers 5.x), and ``Qwen2Config``
whenever Q/K/V carry a bias.
"""

from __future__ import annotations

from ..arch import Arch


def arch_from_hf_config(cfg) -> Arch:
    model_type = getattr(cfg, "model_type", "llama")
    if model_type not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"model_type {model_type!r} is not a Llama-family decoder this toolkit "
                         "handles; supported: llama, mistral, qwen2")
    if getattr(cfg, "mlp_bias", False):
        raise ValueError("mlp_bias=True checkpoints are not supported (no Llama/Mistral/Qwen2 "
                         "release uses it)")
    if model_type == "llama" and getattr(cfg, "attention_bias", False):
        raise ValueError("Llama attention_bias=True (bias on q/k/v/o) is not supported")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = getattr(cfg, "rope_scaling", None) or None
    rope_params = getattr(cfg, "rope_parameters", None) or {}
    theta = rope_params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    if rope is None and rope_params.get("rope_type", "default") != "default":
        rope = dict(rope_params)
    if rope is not None:
        rope = {k: v for k, v in dict(rope).items() if k != "rope_theta"}
        if rope.get("rope_type", rope.get("type")) == "default":
            rope = None
        elif "rope_type" not in rope and "type" in rope:
            rope["rope_type"] = rope.pop("type")
    sliding = getattr(cfg, "sliding_window", None)
    if sliding and getattr(cfg, "use_sliding_window", model_type == "mistral"):
        if sliding < getattr(cfg, "max_position_embeddings", 0):
            raise ValueError(f"sliding_window={sliding} attention is not supported")
    return Arch(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=float(theta),
        rope_scaling=rope,
        norm_eps=cfg.rms_norm_eps,
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        model_type=model_type,
    )


def export_model_type(arch: Arch) -> str:
    if arch.qkv_bias:
        return "qwen2"
    if arch.hidden_size != arch.num_attention_heads * arch.head_dim:
        return "mistral"
    return "llama" if arch.model_type == "llama" else arch.model_type


def hf_config_from_arch(arch: Arch, *, torch_dtype: str = "float32", bos_token_id=None,
                        eos_token_id=None, pad_token_id=None):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    model_type = export_model_type(arch)
    common = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=arch.norm_eps,
        tie_word_embeddings=arch.tie_embeddings,
        hidden_act="silu",
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        dtype=torch_dtype,
    )
    rope = {"rope_type": "default", "rope_theta": arch.rope_theta}
    if arch.rope_scaling:
        rope = dict(arch.rope_scaling, rope_theta=arch.rope_theta)
    if model_type == "llama":
        cfg = LlamaConfig(**common, rope_parameters=rope, attention_bias=False, mlp_bias=False)
    elif model_type == "mistral":
        cfg = MistralConfig(**common, rope_parameters=rope, sliding_window=None)
    else:
        cfg = Qwen2Config(**common, rope_parameters=rope, use_sliding_window=False)
    return cfg

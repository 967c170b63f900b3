"""The architecture of a megatron-core checkpoint: from Megatron-LM's ``args``, from tensor shapes,
and from the user's overrides (``model.arch``).

Megatron-LM keeps its command line (an ``argparse.Namespace``) as ``args`` in ``common.pt``; that is
the architecture record of a Megatron-LM checkpoint. A checkpoint saved by plain megatron-core has
none, and then the shapes give layers, hidden, FFN and vocabulary rows while heads and query
groups must come from ``model.arch``.
"""

from __future__ import annotations

from argparse import Namespace

from ..arch import Arch

# Megatron-LM argument -> Arch field, for the ones that carry over directly.
_DIRECT = {"num_layers": "num_layers", "hidden_size": "hidden_size",
           "ffn_hidden_size": "ffn_hidden_size", "num_attention_heads": "num_attention_heads",
           "max_position_embeddings": "max_position_embeddings", "norm_epsilon": "norm_eps",
           "add_qkv_bias": "qkv_bias"}
# Megatron-LM's hard-coded Llama-3.1 scaling constants (megatron-core rope_utils).
_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def _unsupported(args: Namespace) -> str | None:
    """The first Megatron-LM setting this toolkit's Llama-family models cannot represent."""
    checks = [("swiglu", True, "a gated SiLU MLP (--swiglu)"),
              ("normalization", "RMSNorm", "RMSNorm"),
              ("position_embedding_type", "rope", "rotary position embeddings"),
              ("add_bias_linear", False, "no linear biases (--disable-bias-linear)"),
              ("num_experts", None, "a dense MLP (no --num-experts)"),
              ("qk_layernorm", False, "no QK layernorm"),
              ("multi_latent_attention", False, "standard attention"),
              ("window_size", None, "full attention (no --window-size)")]
    for name, want, what in checks:
        if hasattr(args, name) and getattr(args, name) != want:
            return f"args.{name}={getattr(args, name)!r} (this toolkit needs {what})"
    return None


def arch_fields_from_args(args: Namespace) -> dict:
    """Arch fields recorded in Megatron-LM ``args``; ValueError for models we cannot hold."""
    bad = _unsupported(args)
    if bad:
        raise ValueError(f"the checkpoint's {bad}; only Llama-family dense decoders import")
    out = {f: getattr(args, a) for a, f in _DIRECT.items() if getattr(args, a, None) is not None}
    heads = out.get("num_attention_heads")
    if heads:
        gqa = getattr(args, "group_query_attention", False)
        out["num_query_groups"] = getattr(args, "num_query_groups", None) if gqa else heads
        if getattr(args, "kv_channels", None):
            out["head_dim"] = args.kv_channels
        elif out.get("hidden_size"):
            out["head_dim"] = out["hidden_size"] // heads
    if getattr(args, "rotary_base", None):
        out["rope_theta"] = float(args.rotary_base)
    if getattr(args, "use_rope_scaling", False):
        out["rope_scaling"] = dict(_LLAMA3_ROPE, factor=float(getattr(args, "rope_scaling_factor", 8.0)))
    if hasattr(args, "untie_embeddings_and_output_weights"):
        out["tie_embeddings"] = not args.untie_embeddings_and_output_weights
    if getattr(args, "vocab_size", None):  # the tokenizer's size; padded_vocab_size has padding
        out["vocab_size"] = args.vocab_size
    return {k: v for k, v in out.items() if v is not None}


def infer_from_shapes(shapes: dict[str, tuple]) -> dict:
    """Arch fields the tensors themselves fix (global shapes, megatron names, layers stacked)."""
    emb = shapes["embedding.word_embeddings.weight"]
    fc2 = shapes["decoder.layers.mlp.linear_fc2.weight"]  # [layers, hidden, ffn]
    return {"vocab_size": emb[0], "hidden_size": emb[1], "num_layers": fc2[0],
            "ffn_hidden_size": fc2[2], "tie_embeddings": "output_layer.weight" not in shapes,
            "qkv_bias": "decoder.layers.self_attention.linear_qkv.bias" in shapes}


def check_shapes(arch: Arch, shapes: dict[str, tuple], where) -> None:
    """Raise if ``arch`` does not describe tensors of these shapes (e.g. wrong heads override)."""
    qkv_rows = (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.head_dim
    want = {"decoder.layers.self_attention.linear_qkv.weight":
            (arch.num_layers, qkv_rows, arch.hidden_size),
            "decoder.layers.mlp.linear_fc2.weight":
            (arch.num_layers, arch.hidden_size, arch.ffn_hidden_size)}
    emb = shapes["embedding.word_embeddings.weight"]
    if emb[0] < arch.vocab_size or emb[1] != arch.hidden_size:
        raise ValueError(f"{where}: embedding is {tuple(emb)} but the architecture says vocab_size="
                         f"{arch.vocab_size}, hidden_size={arch.hidden_size}; fix +model.arch.vocab_size / hidden_size")
    for key, shape in want.items():
        if tuple(shapes[key]) != shape:
            raise ValueError(f"{where}: {key} is {tuple(shapes[key])}, the architecture ({arch}) "
                             f"needs {shape}; set +model.arch.num_attention_heads / "
                             "num_query_groups / head_dim to the checkpoint's")

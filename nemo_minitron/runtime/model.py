"""Build a megatron-core ``GPTModel`` for this rank from an :class:`~nemo_minitron.arch.Arch`.

What the model is (``Arch`` -> ``TransformerConfig``), which modules build it (local or Transformer
Engine layer spec) and how ranks are grouped (``parallel_state``, set up in :mod:`.dist`) stay apart,
as in megatron-core itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..arch import Arch
from ..dtypes import torch_dtype
from ..families import NORMS

# megatron-core is imported inside the functions that use it: importing it takes seconds, and this
# module is imported (by the stages, preflight, the tests) long before a model is built.


def te_available() -> bool:
    """True when Transformer Engine imports and a GPU is present (its spec is then the default)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def moe_config(arch: Arch, ep: int = 1, aux_loss_coeff: float = 0.0) -> dict:
    """TransformerConfig fields of a mixture-of-experts arch ({} for a dense one).

    The router is the families' softmax top-k: with renormalisation, megatron selects the k
    largest logits and softmaxes over them, which equals softmax-then-top-k-then-renormalise;
    without, it softmaxes over all experts first (``moe_router_pre_softmax``) and keeps the k
    probabilities as they are. Auxiliary load-balancing losses are off unless
    ``aux_loss_coeff`` > 0 (distillation and pruning should not reshape routing). Tokens move
    with the all-gather dispatcher on CPU (gloo): the all-to-all one allocates a CUDA stream in
    its constructor; on GPUs all-to-all is megatron's choice for expert parallelism. A shared
    expert (Qwen2-MoE) is megatron's ``SharedExpertMLP`` with its sigmoid gate.
    """
    if not arch.is_moe:
        return {}
    _route_without_te()
    return dict(
        num_moe_experts=arch.num_experts,
        moe_ffn_hidden_size=arch.ffn_hidden_size,
        moe_router_topk=arch.moe_top_k,
        moe_router_pre_softmax=not arch.moe_renorm,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss" if aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=aux_loss_coeff,
        moe_token_dispatcher_type="alltoall" if torch.cuda.is_available() else "allgather",
        moe_grouped_gemm=False,
        expert_model_parallel_size=ep,
        moe_shared_expert_intermediate_size=arch.moe_shared_expert_intermediate_size or None,
        moe_shared_expert_gate=arch.has_shared_expert,
    )


def _route_without_te() -> None:
    """megatron-core 0.16's router gating GEMM tests ``te_general_gemm is not None``, a name it
    defines only when Transformer Engine imports; without TE, define it as absent."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def transformer_config(arch: Arch, tp: int, pp: int, dtype: str = "fp32", fp8: str | None = None,
                       init_weights: bool = True, ep: int = 1, aux_loss_coeff: float = 0.0):
    """megatron-core config for ``arch``; ``init_weights=False`` skips random init (weights are
    about to be loaded, and initialising a large embedding on CPU costs seconds);
    ``aux_loss_coeff``: the MoE routers' load-balancing loss (see :func:`moe_config`)."""
    from megatron.core.activations import squared_relu
    from megatron.core.transformer.transformer_config import TransformerConfig

    dt = torch_dtype(dtype)
    gated = arch.mlp == "swiglu"
    on_cpu = not torch.cuda.is_available()
    cfg = TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        # zero-centred (1p) LayerNorm weights are folded into plain ones by the weight maps
        normalization=NORMS[arch.norm],
        layernorm_epsilon=arch.norm_eps,
        qk_layernorm=arch.qk_norm,
        gated_linear_unit=gated,
        activation_func=F.silu if gated else squared_relu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=dt,
        params_dtype=dt,
        bf16=dt == torch.bfloat16,
        fp16=dt == torch.float16,
        use_cpu_initialization=on_cpu,
        perform_initialization=init_weights,
        fp8=fp8,
        # (left, right) tokens each query sees besides itself, as Transformer Engine takes it;
        # the local spec's attention reads it too (runtime/sdpa.py)
        window_size=None if arch.sliding_window is None else (arch.sliding_window - 1, 0),
        **moe_config(arch, ep, aux_loss_coeff),
    )
    # LongRoPE (runtime/rope.py reads these): its cos/sin factor, the longest sequence its
    # short factors are for, and the inverse frequencies of its long factors beyond that
    cfg.rope_attention_factor = arch.rope_attention_factor
    cfg.rope_context_limit = arch.longrope_context
    cfg.rope_long_inv_freq = rope_inv_freq(arch, long=True) \
        if arch.longrope_context is not None else None
    return cfg


def layer_spec(arch: Arch, use_te: bool | None = None):
    """The Transformer Engine spec on CUDA when TE imports (or when forced), else the local spec."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te is None:
        use_te = te_available()
    # experts as a SequentialMLP of per-expert linears under both specs (one weight map);
    # TE's grouped GEMM would need its own
    experts = arch.num_experts or None
    from . import rope

    rope.install()  # rotary tables once per forward, and LongRoPE's factor (see runtime/rope.py)
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_norm)
    spec = specs.get_gpt_layer_local_spec(
        num_experts=experts, moe_grouped_gemm=False,
        normalization=NORMS[arch.norm], qk_layernorm=arch.qk_norm)
    # fused attention instead of megatron's unfused local one (see runtime/sdpa.py)
    from .sdpa import SDPAttention  # subclasses megatron-core's attention: see the module note

    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def rope_inv_freq(arch: Arch, long: bool = False) -> torch.Tensor:
    """Rotary inverse frequencies exactly as Hugging Face computes them (incl. Llama-3 scaling and
    LongRoPE's short factors, or with ``long`` its long ones, for sequences past the pretraining
    context).

    megatron-core hard-codes the Llama-3.1 scaling constants; computing them here lets any
    ``low_freq_factor``/``high_freq_factor``/``original_max_position_embeddings`` round-trip.
    With partial rotary only the first ``rotary_fraction * head_dim`` dims of a head rotate.
    """
    d = int(arch.head_dim * arch.rotary_fraction)
    rs = arch.rope_scaling
    longrope = arch.longrope_context is not None  # its short factors: sequences within context
    ext = torch.tensor(rs["long_factor" if long else "short_factor"], dtype=torch.float32) \
        if longrope else 1.0
    inv = 1.0 / (ext * arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if rs and not longrope:  # Llama 3.1
        factor = rs["factor"]
        low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old = rs.get("original_max_position_embeddings", 8192)
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Tag sharded weights as megatron's initialisers do (``tensor_model_parallel``, dim, stride).

    megatron-core sets these attributes only inside its weight initialisers, which are skipped
    when weights are about to be loaded; without them the gradient norm (and so clipping) counts
    only TP rank 0's shards, and optimizers treat shards as duplicates.
    """
    from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                      VocabParallelEmbedding,
                                                      set_tensor_model_parallel_attributes)

    for m in model.modules():
        w = getattr(m, "weight", None)
        if w is None or getattr(w, "tensor_model_parallel", False):
            continue
        if isinstance(m, (ColumnParallelLinear, VocabParallelEmbedding)):
            set_tensor_model_parallel_attributes(w, True, 0, 1)
        elif isinstance(m, RowParallelLinear):
            set_tensor_model_parallel_attributes(w, True, 1, 1)


def cast_stray_params(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters still fp32 in a bf16/fp16 model, cast to it.

    megatron-core's torch-norm fallback (no Apex, no TE: the CPU spec) builds its RMSNorm and
    LayerNorm weights in fp32 whatever ``params_dtype`` says; on GPUs ``Float16Module`` casts the
    whole model, norms included. A bf16 input with an fp32 norm weight misses PyTorch's fused
    ``rms_norm`` kernel (and warns about it on every call). The optimizer's fp32 main weights
    keep the precision of the update, as for every other weight.
    """
    if dtype == torch.float32:
        return
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


# GPTModels this process has built: a cheap marker that lets tests assert a bad request was
# refused before any model existed (the checks must come first, not merely fail eventually).
models_built = 0


def build_gpt(arch: Arch, config, pre_process: bool, post_process: bool, use_te: bool | None = None):
    """One pipeline stage of the model, parameters initialised (weights are loaded afterwards)."""
    from megatron.core.models.gpt import GPTModel

    global models_built
    models_built += 1

    tp = config.tensor_model_parallel_size
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, use_te),
        vocab_size=arch.padded_vocab_size(tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope",
        rotary_percent=arch.rotary_fraction,
        rotary_base=int(arch.rope_theta),
        parallel_output=True,
    )
    model.rotary_pos_emb.inv_freq = rope_inv_freq(arch).to(model.rotary_pos_emb.inv_freq.device)
    if not config.perform_initialization:
        mark_tensor_parallel_weights(model)
    cast_stray_params(model, config.params_dtype)
    if not torch.cuda.is_available():
        model.to(torch.device("cpu"))
    else:
        model.cuda(torch.cuda.current_device())
    return model

"""Tiny random Hugging Face decoders of every family we map, the word-level tokenizer saved with
them, a batch of random tokens, and the round trip of a pruned checkpoint through HF export."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, MixtralConfig, MixtralForCausalLM, NemotronConfig,
                          NemotronForCausalLM, Phi3Config, Phi3ForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.convert.hf import export_hf


def _randomize(params, mean: float, std: float) -> None:
    """Random init leaves norms at one (or zero) and biases at zero: make them matter."""
    with torch.no_grad():
        for p in params:
            p.normal_(mean, std)


def _moe_randomize(model) -> None:
    """Norms away from one, and routers decisive: a random router of std 0.02 gives near-equal
    logits, whose top-k is decided by rounding rather than by the weights."""
    _randomize([p for n, p in model.named_parameters() if "norm" in n], 1.0, 0.3)
    _randomize([p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")], 0.0, 0.5)


def tiny_hf(kind: str = "gqa", seed: int = 0):
    """A random tiny decoder in float32; kinds cover the architecture variants and families we map."""
    torch.manual_seed(seed)
    base = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
    if kind == "gqa":
        model = LlamaForCausalLM(LlamaConfig(**base))
    elif kind == "tied":
        model = LlamaForCausalLM(LlamaConfig(**dict(base, tie_word_embeddings=True, num_key_value_heads=4)))
    elif kind == "head_dim":  # head_dim != hidden/heads, as after width pruning
        model = MistralForCausalLM(MistralConfig(**dict(base, head_dim=48, sliding_window=None)))
    elif kind == "llama3_rope":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500000.0}
        model = LlamaForCausalLM(LlamaConfig(**dict(base, rope_parameters=rope)))
    elif kind == "odd_vocab":  # not divisible by TP: rows are padded, padding masked in the loss
        model = LlamaForCausalLM(LlamaConfig(**dict(base, vocab_size=1001, tie_word_embeddings=True)))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**dict(base, use_sliding_window=False)))
        with torch.no_grad():  # random init leaves biases at zero: make them matter
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.5)
    elif kind == "qwen3":  # QK-norm, GQA, explicit head_dim
        model = Qwen3ForCausalLM(Qwen3Config(**dict(base, head_dim=32, use_sliding_window=False)))
        _randomize([p for n, p in model.named_parameters() if "norm" in n], 1.0, 0.3)
    elif kind == "nemotron":  # LayerNorm1P with bias, squared-ReLU MLP, half the head rotated
        cfg = {k: v for k, v in base.items() if k != "rms_norm_eps"}
        model = NemotronForCausalLM(NemotronConfig(**cfg, norm_eps=1e-5, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}))
        _randomize([p for n, p in model.named_parameters() if "norm" in n], 0.0, 0.3)
    elif kind == "mixtral":  # 8 experts of width 64, top-2, renormalised
        model = MixtralForCausalLM(MixtralConfig(**dict(base, intermediate_size=64), num_local_experts=8,
                                                 num_experts_per_tok=2, sliding_window=None))
        _moe_randomize(model)
    elif kind == "qwen3_moe":  # QK-norm, 8 experts of width 64, top-2 kept as softmax gave them
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**base, head_dim=32, num_experts=8,
                                                   num_experts_per_tok=2, moe_intermediate_size=64,
                                                   norm_topk_prob=False, use_sliding_window=False))
        _moe_randomize(model)
    elif kind == "qwen2_moe":  # q/k/v biases, 8 experts of width 64, top-2 renormalised, and a
        # sigmoid-gated shared expert of width 96
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**base, num_experts=8, num_experts_per_tok=2,
                                                   moe_intermediate_size=64, norm_topk_prob=True,
                                                   shared_expert_intermediate_size=96,
                                                   use_sliding_window=False))
        _moe_randomize(model)  # and biases and the shared gate away from zero: token-dependent
        _randomize([p for n, p in model.named_parameters()
                    if n.endswith(("proj.bias", "shared_expert_gate.weight"))], 0.0, 0.5)
    elif kind == "phi3_longrope":  # Phi-3-mini-128k's LongRoPE: per-pair factors for contexts up
        # to the 64 pretraining tokens, the context grown 4x (cos/sin scaled by ~1.155)
        g = torch.Generator().manual_seed(3)
        factors = lambda: (1 + 3 * torch.rand(12, generator=g)).tolist()  # noqa: E731
        model = Phi3ForCausalLM(Phi3Config(
            **dict(base, max_position_embeddings=256), original_max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=0,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.75, "short_factor": factors(),
                             "long_factor": factors()}))
        _randomize([p for n, p in model.named_parameters() if "norm" in n], 1.0, 0.3)
    elif kind == "mistral_swa":  # each token sees itself and the 7 before it (Mistral-7B-v0.1's
        # sliding-window attention, at a window that the tests' sequences exceed)
        model = MistralForCausalLM(MistralConfig(**dict(base, sliding_window=8)))
    elif kind == "phi3":  # fused qkv_proj and gate_up_proj, GQA, three quarters of a head rotated
        model = Phi3ForCausalLM(Phi3Config(**base, pad_token_id=0, bos_token_id=1, eos_token_id=0,
                                           rope_parameters={"rope_type": "default",
                                                            "rope_theta": 10000.0,
                                                            "partial_rotary_factor": 0.75}))
        _randomize([p for n, p in model.named_parameters() if "norm" in n], 1.0, 0.3)
    elif kind == "llama_pruned":  # hidden 512 with 6 heads of 64, as ModelOpt/Bridge export it;
        # stock LlamaConfig rejects it, so it is written as Mistral (same weights and math) and
        # hf_dir() relabels config.json as llama
        model = MistralForCausalLM(MistralConfig(**dict(
            base, hidden_size=512, num_attention_heads=6, num_key_value_heads=2, head_dim=64,
            num_hidden_layers=2, sliding_window=None)))
    else:
        raise ValueError(kind)
    return model.eval()


def tiny_tokenizer():
    """A word-level tokenizer over 1000 ids, enough to save/load alongside tiny models."""
    vocab = {"<eos>": 0, "<unk>": 1}
    vocab.update({f"w{i}": i for i in range(2, 1000)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def batch(vocab, b=2, s=24, seed=1):
    """A micro-batch of random tokens in the layout the model's forward takes."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    return {"tokens": ids, "position_ids": torch.arange(s).expand(b, s),
            "labels": torch.roll(ids, -1, 1), "loss_mask": torch.ones(b, s)}


def canonical_state(model, arch) -> dict:
    """A Hugging Face model's tensors under our canonical names (Phi-3's fused projections
    split, as import does)."""
    from nemo_minitron.convert.fused import unfuse
    from nemo_minitron.families import family

    sd = model.state_dict()
    return unfuse(sd, arch) if family(arch.model_type).fused else sd


def exported(path, arch, tensors, tokens):
    """Saves ``tensors`` of ``arch`` as a checkpoint at ``path``, exports it to Hugging Face
    beside it (``<path>/../hf``) and loads that with stock transformers: (HF directory, the
    model in float32, its logits on ``tokens``)."""
    ckpt.save(path, arch, tensors, tokenizer=tiny_tokenizer())
    out = export_hf(str(path), path.parent / "hf")
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = back(tokens).logits
    return out, back, logits

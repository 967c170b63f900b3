"""Shared fixtures: tiny random Hugging Face models and a torchrun launcher for multi-rank tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The suite's fixtures and references live on the CPU: on a GPU host it runs as it does in CI (gloo,
# local spec; every torchrun worker inherits this). GPU paths are checked by benchmarks/gpu_check.py.
os.environ.setdefault("NEMO_MINITRON_DEVICE", "cpu")

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).parent / "workers"
sys.path.insert(0, str(WORKERS))  # tests reuse job factories of the multi-rank workers


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
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              MixtralConfig, MixtralForCausalLM, NemotronConfig,
                              NemotronForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

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
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1}
    vocab.update({f"w{i}": i for i in range(2, 1000)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture
def hf_dir(tmp_path):
    """Save a tiny HF model (+tokenizer) and return (dir, model)."""
    def make(kind="gqa"):
        m = tiny_hf(kind)
        d = tmp_path / f"hf_{kind}"
        m.save_pretrained(d)
        tiny_tokenizer().save_pretrained(d)
        if kind == "llama_pruned":
            cfg = json.loads((d / "config.json").read_text())
            cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=False,
                       mlp_bias=False)
            del cfg["sliding_window"]
            (d / "config.json").write_text(json.dumps(cfg, indent=2))
        return d, m
    return make


def torchrun(worker: str, nproc: int, *args, timeout: int = 600) -> list[dict]:
    """Run tests/workers/<worker> under torchrun; returns the JSON rows every rank emitted."""
    import tempfile

    rdir = tempfile.mkdtemp(prefix="results-")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", RESULT_DIR=rdir,
               PYTHONPATH=os.pathsep.join([str(ROOT), str(WORKERS)]))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={_free_port()}",
           str(WORKERS / worker), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        raise AssertionError(f"torchrun {worker} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    rows = []
    for f in sorted(Path(rdir).glob("rank*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines()]
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def single_rank():
    """Megatron groups for a one-process gloo world (TP=PP=DP=1), shared by the session."""
    from nemo_minitron.runtime import dist

    dist.init(1, 1)
    yield


@pytest.fixture(scope="session")
def teacher():
    """The embedded SmolLM2-135M teacher checkpoint (installed by scripts/setup.sh)."""
    from nemo_minitron import defaults

    path = defaults.checkpoint_dir()
    assert (path / "minitron.json").is_file(), (
        f"default teacher missing at {path}: run `python -m nemo_minitron.assets install`")
    return path


@pytest.fixture(scope="session")
def hf_teacher(teacher, tmp_path_factory):
    """The teacher exported to Hugging Face and loaded with stock transformers (fp32, eval)."""
    from transformers import AutoModelForCausalLM

    from nemo_minitron.convert.hf import export_hf

    out = export_hf(str(teacher), tmp_path_factory.mktemp("smol") / "hf")
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()

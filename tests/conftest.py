"""Shared fixtures: tiny Hugging Face model directories, the one-process Megatron world, and the
embedded SmolLM2-135M teacher. Helpers that are not fixtures live in ``tests.helpers``."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers import tiny_hf, tiny_tokenizer

# The suite's fixtures and references live on the CPU: on a GPU host it runs as it does in CI (gloo,
# local spec; every torchrun worker inherits this). GPU paths are checked by benchmarks/gpu_check.py.
os.environ.setdefault("NEMO_MINITRON_DEVICE", "cpu")


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


@pytest.fixture(scope="session")
def single_rank():
    """Megatron groups for a one-process gloo world (TP=PP=DP=1), shared by the session."""
    from nemo_minitron.runtime import dist

    dist.init(1, 1)
    yield


@pytest.fixture(scope="session")
def teacher():
    """The embedded SmolLM2-135M teacher checkpoint (installed by scripts/setup.sh)."""
    from nemo_minitron import demo

    path = demo.checkpoint_dir()
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

"""Mixture-of-experts families (Mixtral, Qwen3-MoE): import from what save_pretrained writes,
logits as transformers computes them (both router variants), export that stock from_pretrained
loads, analytic total/active parameter counts, refusals; EP=2, TP=2 and PP=2 in one launch."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from nemo_minitron.arch import Arch
from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.convert.experts import per_expert
from nemo_minitron.convert.hf import export_hf, import_hf
from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.runtime.forward import gather_logits, run_forward
from nemo_minitron.runtime.stage import build_stage, load_checkpoint, load_state

from conftest import tiny_hf, tiny_tokenizer, torchrun
from test_parity import batch

TOL = 1e-4
KINDS = ("mixtral", "qwen3_moe")


def logits_of(stage, b):
    return run_forward(stage, [b], lambda lg, _: {
        "logits": gather_logits(lg, stage.arch.vocab_size)})[0]["logits"]


@pytest.mark.parametrize("kind", KINDS)
def test_import_matches_transformers_and_exports_back(kind, hf_dir, tmp_path, single_rank):
    """save_pretrained's per-expert files -> our checkpoint -> megatron logits == transformers';
    the in-memory fused experts split to exactly those files; export -> from_pretrained same."""
    src, hf = hf_dir(kind)
    c = ckpt.Checkpoint(import_hf(str(src), tmp_path / "ours"))
    arch = c.arch
    assert (arch.num_experts, arch.moe_top_k, arch.ffn_hidden_size) == (8, 2, 64)
    assert arch.moe_renorm == (kind == "mixtral")  # tiny qwen3_moe keeps norm_topk_prob=False
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        on_disk = {k: f.get_tensor(k) for k in f.keys()}
    split = per_expert(hf.state_dict(), arch)
    assert set(split) == set(on_disk) == set(c.keys())
    for k, v in on_disk.items():
        assert torch.equal(split[k], v) and torch.equal(c.get(k), v), k
    b = batch(arch.vocab_size)
    with torch.no_grad():
        ref = hf(b["tokens"]).logits
    stage, _ = load_checkpoint(c.path)
    delta = (logits_of(stage, b) - ref).abs().max().item()
    assert delta <= TOL, f"{kind}: max |dlogit| = {delta}"
    out = export_hf(str(c.path), tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == kind and cfg["num_experts_per_tok"] == 2
    assert not cfg["output_router_logits"]
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(back(b["tokens"]).logits, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_total_and_active_parameter_counts(kind, single_rank):
    """Arch counts against the built megatron model: all of it, and the router plus top-k of
    each layer's experts (what one token passes through)."""
    hf = tiny_hf(kind)
    arch = arch_from_hf_config(hf.config)
    stage = build_stage(arch)
    total = sum(p.numel() for p in stage.model.parameters())
    assert arch.num_params() == total == sum(p.numel() for p in hf.parameters())
    experts = [layer.mlp.experts.local_experts for layer in stage.model.decoder.layers]
    per_expert_params = [sum(p.numel() for p in e[0].parameters()) for e in experts]
    active = total - sum((len(e) - arch.moe_top_k) * n for e, n in zip(experts, per_expert_params))
    assert arch.num_active_params() == active < total
    emb = sum(p.numel() for n, p in stage.model.named_parameters()
              if n.startswith(("embedding.", "output_layer.")))
    assert arch.num_active_params(embeddings=False) == active - emb
    dense = arch.replace(model_type="qwen3" if arch.qk_norm else "mistral", num_experts=0,
                         moe_top_k=0, moe_renorm=False)
    assert dense.num_active_params() == dense.num_params()


@pytest.mark.parametrize("change, field", [
    ({"mlp_only_layers": [1]}, "mlp_only_layers=[1]"),
    ({"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    ({"num_experts_per_tok": 9}, "arch.moe_top_k=9 must be in [1, num_experts=8]"),
    ({"sliding_window": 64, "use_sliding_window": True}, "sliding_window=64"),
])
def test_unsupported_moe_configs_are_refused(change, field):
    d = tiny_hf("qwen3_moe").config.to_dict()
    with pytest.raises(ValueError, match=re.escape(field)):
        arch_from_hf_config({**d, **change})


def test_moe_arch_and_layout_refusals():
    a = arch_from_hf_config(tiny_hf("mixtral").config)
    with pytest.raises(ValueError, match=re.escape("arch.moe_renorm=False: mixtral always has")):
        a.replace(moe_renorm=False)
    with pytest.raises(ValueError, match=re.escape("arch.moe_top_k=1 with moe_renorm=true")):
        a.replace(moe_top_k=1)
    with pytest.raises(ValueError, match=re.escape("num_experts=8 is not divisible by parallel.ep=3")):
        a.check_parallel(1, 1, 3)
    dense = Arch.from_dict({**a.to_dict(), "model_type": "mistral", "num_experts": 0,
                            "moe_top_k": 0, "moe_renorm": False})
    with pytest.raises(ValueError, match=re.escape("parallel.ep=2 needs a mixture-of-experts")):
        dense.check_parallel(1, 1, 2)


# ------------------------------------------------------------------ multi-rank (one launch)
@pytest.fixture(scope="module")
def multi_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe")
    for kind in KINDS:
        hf = tiny_hf(kind)
        arch = arch_from_hf_config(hf.config)
        ckpt.save(tmp / kind, arch, per_expert(hf.state_dict(), arch), tokenizer=tiny_tokenizer())
        b = batch(arch.vocab_size, s=32)
        with torch.no_grad():
            logits = hf(b["tokens"]).logits
        torch.save({"batches": [b], "logits": logits}, tmp / f"{kind}.pt")
    return tmp, torchrun("moe.py", 2, tmp)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["ep2", "tp2", "pp2"])
def test_multi_rank_logit_parity(multi_rank, kind, layout):
    _, rows = multi_rank
    mine = [r for r in rows if r["family"] == kind and r["layout"] == layout]
    deltas = [r["max_dlogit"] for r in mine if r["max_dlogit"] is not None]
    assert deltas and max(deltas) <= TOL, f"{kind} {layout}: {deltas}"
    assert {r["local_experts"] for r in mine} == {4 if layout == "ep2" else 8}


@pytest.mark.parametrize("kind", KINDS)
def test_expert_parallel_save_gathers_every_expert(multi_rank, kind):
    tmp, _ = multi_rank
    src, got = ckpt.Checkpoint(tmp / kind), ckpt.Checkpoint(tmp / f"{kind}_ep2")
    assert got.arch == src.arch and set(got.keys()) == set(src.keys())
    for k in src.keys():
        assert torch.equal(got.get(k), src.get(k)), k

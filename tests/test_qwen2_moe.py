"""Qwen2-MoE: routed experts plus a shared expert gated by sigmoid(shared_expert_gate(x)) on
megatron-core's SharedExpertMLP. Import from what save_pretrained writes and logits as
transformers computes them, export that stock from_pretrained loads, total/active parameter
counts with the shared expert, its neuron importance against a reference from transformers'
tensors, pruning experts, expert width and shared width (export loads with the pruned model's
logits), refusals; EP=2 and TP=2 parity, an EP=2 save, EP=2 and TP=2 prunes in one launch."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.convert.experts import per_expert
from nemo_minitron.convert.hf import export_hf, import_hf
from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.convert.weights import canonical_keys, shared_keys
from nemo_minitron.data.packed import PackedSequences
from nemo_minitron.importance.calibrate import batches_forward_loop, calibrate
from nemo_minitron.pruning.apply import apply_plan
from nemo_minitron.pruning.plan import Plan, identity_plan, top_k
from nemo_minitron.pruning.select import Targets, make_plan, random_importance
from nemo_minitron.runtime.shard import build_shard, load_checkpoint, load_state

from tests.helpers import batch, exported, tiny_corpus, tiny_hf, tiny_tokenizer, torchrun
from tests.test_moe import logits_of, moe_shard, reference_expert_stats
from tests.workers.qwen2_moe import TARGET

TOL = 1e-4
KIND = "qwen2_moe"


def test_import_matches_transformers_and_exports_back(hf_dir, tmp_path, single_rank):
    src, hf = hf_dir(KIND)
    c = ckpt.Checkpoint(import_hf(str(src), tmp_path / "ours"))
    arch = c.arch
    assert (arch.num_experts, arch.moe_top_k, arch.ffn_hidden_size, arch.moe_renorm,
            arch.moe_shared_expert_intermediate_size, arch.qkv_bias) == (8, 2, 64, True, 96, True)
    on_disk = per_expert(hf.state_dict(), arch)
    assert set(c.keys()) == set(on_disk) and all(torch.equal(c.get(k), v) for k, v in on_disk.items())
    b = batch(arch.vocab_size)
    shard, _ = load_checkpoint(c.path)
    with torch.no_grad():
        ref = hf(b["tokens"]).logits
        assert (logits_of(shard, b) - ref).abs().max().item() <= TOL
    cfg = json.loads((export_hf(str(c.path), tmp_path / "hf") / "config.json").read_text())
    assert (cfg["model_type"], cfg["shared_expert_intermediate_size"], cfg["norm_topk_prob"],
            cfg["mlp_only_layers"], cfg["decoder_sparse_step"]) == (KIND, 96, True, [], 1)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(back(b["tokens"]).logits, ref)


def test_total_and_active_counts_include_the_shared_expert(single_rank):
    hf = tiny_hf(KIND)
    arch = arch_from_hf_config(hf.config)
    shard = build_shard(arch)
    total = sum(p.numel() for p in shard.model.parameters())
    assert arch.num_params() == total == sum(p.numel() for p in hf.parameters())
    layers = [layer.mlp for layer in shard.model.decoder.layers]
    per_expert_params = sum(p.numel() for p in layers[0].experts.local_experts[0].parameters())
    active = total - len(layers) * (arch.num_experts - arch.moe_top_k) * per_expert_params
    assert arch.num_active_params() == active
    shared = sum(p.numel() for m in layers for p in m.shared_experts.parameters())
    assert shared == arch.num_layers * (3 * 128 * 96 + 128)  # gate/up/down and the gate score
    assert arch.replace(moe_shared_expert_intermediate_size=48).num_active_params() == \
        active - arch.num_layers * 3 * 128 * 48


def test_shared_expert_importance_matches_reference(single_rank):
    """Shared-expert neuron score = L2 over samples of the sequence mean of |act * gate|, with
    act the down projection's input and gate the token's sigmoid score; experts as for the
    other MoE families."""
    hf, arch, shard = moe_shard(KIND)
    batches = [batch(arch.vocab_size, seed=s) for s in (1, 2)]
    imp = calibrate(shard, batches_forward_loop(shard, batches, None))
    assert imp.shared_ffn.shape == (arch.num_layers, 96)
    for i, (contribution, neurons) in enumerate(reference_expert_stats(hf, arch, batches)):
        assert torch.allclose(imp.experts[i], contribution, rtol=1e-4, atol=1e-6), i
        assert torch.allclose(imp.ffn[i], neurons, rtol=1e-4, atol=1e-6), i
    for i, layer in enumerate(hf.model.layers):
        seen = []
        h = layer.mlp.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
        with torch.no_grad():
            for b in batches:
                hf(b["tokens"])
        h.remove()
        se, gate = layer.mlp.shared_expert, layer.mlp.shared_expert_gate
        with torch.no_grad():
            per_sample = torch.cat([(torch.nn.functional.silu(se.gate_proj(x)) * se.up_proj(x)
                                     * torch.sigmoid(gate(x))).abs().mean(1) for x in seen])
        assert torch.allclose(imp.shared_ffn[i], per_sample.pow(2).sum(0).sqrt(), rtol=1e-4,
                              atol=1e-7), i


def test_prune_experts_widths_and_shared_width_export_with_the_pruned_logits(single_rank, tmp_path):
    """Calibrate, prune 8 -> 4 experts, expert width 64 -> 32, shared width 96 -> 48, hidden
    128 -> 96 and a layer; the megatron model of the plan and the export in stock
    from_pretrained agree, and their parameter counts are the target arch's."""
    hf, arch, shard = moe_shard(KIND)
    imp = calibrate(shard, batches_forward_loop(shard, [batch(arch.vocab_size, seed=s)
                                                        for s in (1, 2)], None))
    plan = make_plan(arch, imp, Targets(**TARGET, num_layers=3))
    for pos, layer in enumerate(plan.layers):
        assert plan.shared_ffn[pos] == top_k(imp.shared_ffn[layer], 48)
    tgt = plan.target
    assert (tgt.num_experts, tgt.ffn_hidden_size, tgt.moe_shared_expert_intermediate_size) == (4, 32, 48)
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))).shared_ffn == plan.shared_ffn
    src = per_expert(hf.state_dict(), arch)
    tensors = apply_plan(plan, src)
    assert set(tensors) == set(canonical_keys(tgt))
    b = batch(arch.vocab_size)
    pruned = build_shard(tgt)
    load_state(pruned, tensors.__getitem__)
    assert sum(p.numel() for p in pruned.model.parameters()) == tgt.num_params()
    ours = logits_of(pruned, b)
    _, back, theirs = exported(tmp_path / "pruned", tgt, tensors, b["tokens"])
    assert sum(p.numel() for p in back.parameters()) == tgt.num_params()
    delta = (ours - theirs).abs().max().item()
    assert delta <= TOL, f"max |dlogit| = {delta}"
    # new layer 1's shared expert is what the plan kept of its source layer's
    old, hid, keep = plan.layers[1], torch.tensor(plan.hidden), torch.tensor(plan.shared_ffn[1])
    gate, up, down, score = shared_keys(arch)
    p, n = f"model.layers.{old}.", "model.layers.1."
    assert torch.equal(tensors[n + up], src[p + up][keep][:, hid])
    assert torch.equal(tensors[n + down], src[p + down][hid][:, keep])
    assert torch.equal(tensors[n + score], src[p + score][:, hid])
    # the random baseline and the identity plan cover the axis too
    assert make_plan(arch, random_importance(arch, 0), Targets(**TARGET)).target == \
        plan.target.replace(num_layers=4)
    assert apply_plan(identity_plan(arch), src).keys() == src.keys()


@pytest.mark.parametrize("change, field", [
    ({"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size=0: qwen2_moe needs a positive"),
    ({"qkv_bias": False}, "config qkv_bias=false is not supported for qwen2_moe"),
    ({"mlp_only_layers": [1]}, "mlp_only_layers=[1]"),
    ({"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
])
def test_unsupported_qwen2_moe_configs_are_refused(change, field):
    d = tiny_hf(KIND).config.to_dict()
    with pytest.raises(ValueError, match=re.escape(field)):
        arch_from_hf_config({**d, **change})


def test_shared_targets_and_plans_are_refused_naming_the_field():
    arch = arch_from_hf_config(tiny_hf(KIND).config)
    with pytest.raises(ValueError, match=re.escape(
            "prune.target.moe_shared_expert_intermediate_size=97 must be in [1, 96]")):
        Targets(moe_shared_expert_intermediate_size=97).resolve(arch)
    other = arch_from_hf_config(tiny_hf("qwen3_moe").config)
    with pytest.raises(ValueError, match=re.escape("the source model has no shared expert")):
        Targets(moe_shared_expert_intermediate_size=8).resolve(other)
    with pytest.raises(ValueError, match=re.escape("plan.shared_ffn given for a model without")):
        Plan(other, **{**_keep(other), "shared_ffn": [0]})
    with pytest.raises(ValueError, match=re.escape("plan.shared_ffn must be sorted unique indices in [0, 96)")):
        Plan(arch, **{**_keep(arch), "shared_ffn": [3, 1]})
    with pytest.raises(ValueError, match=re.escape("moe_shared_expert_intermediate_size=95 is not divisible by parallel.tp=2")):
        arch.replace(moe_shared_expert_intermediate_size=95).check_parallel(2, 1)
    assert Targets.of(arch).moe_shared_expert_intermediate_size == 96
    assert Targets.of(other).moe_shared_expert_intermediate_size is None


def _keep(arch):
    return dict(hidden=list(range(arch.hidden_size)), ffn=list(range(arch.ffn_hidden_size)),
                groups=list(range(arch.num_query_groups)), heads=list(range(arch.num_attention_heads)),
                layers=list(range(arch.num_layers)))


# ------------------------------------------------------------------ multi-rank (one launch)
@pytest.fixture(scope="module")
def multi_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen2_moe")
    tiny_corpus(tmp / "corpus")
    hf = tiny_hf(KIND)
    arch = arch_from_hf_config(hf.config)
    ckpt.save(tmp / "src", arch, per_expert(hf.state_dict(), arch), tokenizer=tiny_tokenizer())
    b = batch(arch.vocab_size, s=32)
    with torch.no_grad():
        torch.save({"batches": [b], "logits": hf(b["tokens"]).logits}, tmp / "ref.pt")
    return tmp, torchrun(KIND, 2, tmp, tmp / "corpus")


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["ep2", "tp2"])
def test_multi_rank_logit_parity(multi_rank, layout):
    _, rows = multi_rank
    deltas = [r["max_dlogit"] for r in rows if r["layout"] == layout]
    assert len(deltas) == 2 and max(deltas) <= TOL, f"{layout}: {deltas}"


@pytest.mark.multirank
def test_expert_parallel_save_gathers_experts_and_the_shared_expert(multi_rank):
    tmp, _ = multi_rank
    src, got = ckpt.Checkpoint(tmp / "src"), ckpt.Checkpoint(tmp / "ep2")
    assert got.arch == src.arch and set(got.keys()) == set(src.keys())
    for k in src.keys():
        assert torch.equal(got.get(k), src.get(k)), k


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["ep2", "tp2"])
def test_parallel_prune_keeps_what_one_process_keeps(multi_rank, layout, single_rank):
    """`prune` at EP=2 (calibration batches over the two data-parallel ranks, experts over the
    two expert-parallel ranks, the shared expert on both) and at TP=2 (routed and shared
    experts' neurons split over the two ranks, routed outputs summed before their norms) plans
    and writes what one process does with all batches, shared-expert neurons included."""
    tmp, rows = multi_rank
    hf, arch, shard = moe_shard(KIND)
    data = PackedSequences(tmp / "corpus", 32, split="train", valid_fraction=0.1)
    imp = calibrate(shard, batches_forward_loop(shard, data.batches(2, num_batches=4), None))
    plan = make_plan(arch, imp, Targets(**TARGET))
    got = Plan.load(Path(tmp) / f"pruned_{layout}" / "plan.json")
    assert (got.experts, got.ffn, got.shared_ffn, got.hidden) == (
        plan.experts, plan.ffn, plan.shared_ffn, plan.hidden)
    out = ckpt.Checkpoint(tmp / f"pruned_{layout}")
    ref = apply_plan(plan, ckpt.Checkpoint(tmp / "src").get)
    assert out.arch == plan.target and set(out.keys()) == set(ref)
    for k, v in ref.items():
        assert torch.allclose(out.get(k), v, atol=1e-6), k
    row = next(r for r in rows if r["layout"] == f"prune_{layout}")
    assert row["target_active"] == plan.target.num_active_params() < row["target_params"]

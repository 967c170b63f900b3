"""Mixture-of-experts families (Mixtral, Qwen3-MoE): import from what save_pretrained writes,
logits as transformers computes them (both router variants), export that stock from_pretrained
loads, analytic total/active parameter counts, expert and expert-neuron importance against a
reference computed from transformers' tensors, pruning experts and expert width (export loads
with the pruned model's logits), refusals; EP=2, TP=2, PP=2 and an EP=2 prune in one launch."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from nemo_minitron.arch import Arch
from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.convert.experts import per_expert
from nemo_minitron.convert.hf import export_hf, import_hf
from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.convert.weights import canonical_keys, expert_keys, router_key
from nemo_minitron.data.packed import PackedSequences
from nemo_minitron.importance.calibrate import batches_forward_loop, calibrate
from nemo_minitron.importance.scores import expert_scores
from nemo_minitron.pruning.apply import apply_plan
from nemo_minitron.pruning.plan import Plan, top_k
from nemo_minitron.pruning.select import Targets, make_plan
from nemo_minitron.runtime.forward import gather_logits, run_forward
from nemo_minitron.runtime.shard import build_shard, load_checkpoint, load_state

from tests.helpers import batch, exported, metrics, tiny_corpus, tiny_hf, tiny_tokenizer, torchrun
from tests.workers.moe import prune_job

TOL = 1e-4
KINDS = ("mixtral", "qwen3_moe")


def logits_of(shard, b):
    return run_forward(shard, [b], lambda lg, _: {
        "logits": gather_logits(lg, shard.arch.vocab_size)})[0]["logits"]


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
    shard, _ = load_checkpoint(c.path)
    delta = (logits_of(shard, b) - ref).abs().max().item()
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
    shard = build_shard(arch)
    total = sum(p.numel() for p in shard.model.parameters())
    assert arch.num_params() == total == sum(p.numel() for p in hf.parameters())
    experts = [layer.mlp.experts.local_experts for layer in shard.model.decoder.layers]
    per_expert_params = [sum(p.numel() for p in e[0].parameters()) for e in experts]
    active = total - sum((len(e) - arch.moe_top_k) * n for e, n in zip(experts, per_expert_params))
    assert arch.num_active_params() == active < total
    emb = sum(p.numel() for n, p in shard.model.named_parameters()
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


def moe_shard(kind):
    hf = tiny_hf(kind)
    arch = arch_from_hf_config(hf.config)
    shard = build_shard(arch)
    load_state(shard, per_expert(hf.state_dict(), arch).__getitem__)
    return hf, arch, shard


def reference_expert_stats(hf, arch, batches):
    """Per layer: (sum over tokens of p * ||y|| per expert, L2 of the routing-weighted expert
    activations per neuron over every expert), recomputed from transformers' own tensors."""
    seen = {i: [] for i in range(arch.num_layers)}
    hooks = [hf.model.layers[i].mlp.register_forward_pre_hook(
        lambda _m, a, i=i: seen[i].append(a[0])) for i in range(arch.num_layers)]
    with torch.no_grad():
        for b in batches:
            hf(b["tokens"])
    for h in hooks:
        h.remove()
    out = []
    for i in range(arch.num_layers):
        x = torch.cat([t.reshape(-1, arch.hidden_size) for t in seen[i]])
        moe = hf.model.layers[i].mlp
        top, idx = torch.softmax(x @ moe.gate.weight.T, -1).topk(arch.moe_top_k, -1)
        if arch.moe_renorm:
            top = top / top.sum(-1, keepdim=True)
        contribution, sumsq = torch.zeros(arch.num_experts), torch.zeros(arch.ffn_hidden_size)
        for e in range(arch.num_experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            gate, up = (x[rows] @ moe.experts.gate_up_proj[e].T).chunk(2, -1)
            act = torch.nn.functional.silu(gate) * up * top[rows, slot, None]
            contribution[e] = (act @ moe.experts.down_proj[e].T).norm(dim=-1).sum()
            sumsq += act.pow(2).sum(0)
        out.append((contribution, sumsq.sqrt()))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_expert_importance_matches_reference(kind, single_rank):
    hf, arch, shard = moe_shard(kind)
    batches = [batch(arch.vocab_size, seed=s) for s in (1, 2)]
    imp = calibrate(shard, batches_forward_loop(shard, batches, None))
    assert imp.experts.shape == (arch.num_layers, arch.num_experts)
    assert imp.meta["expert_score"] == "contribution"
    for i, (contribution, neurons) in enumerate(reference_expert_stats(hf, arch, batches)):
        assert torch.allclose(imp.experts[i], contribution, rtol=1e-4, atol=1e-6), i
        assert torch.allclose(imp.ffn[i], neurons, rtol=1e-4, atol=1e-6), i


def test_expert_score_functions():
    stats = torch.tensor([[[10.0, 20.0, 5.0], [1.0, 9.0, 4.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    assert expert_scores(stats).tolist() == [[5.0, 4.0, 0.0]]
    assert expert_scores(stats, "mean_norm").tolist() == [[2.0, 9.0, 0.0]]  # ModelOpt's
    with pytest.raises(ValueError, match="expert score 'x' unknown"):
        expert_scores(stats, "x")


@pytest.mark.parametrize("kind", KINDS)
def test_pruned_experts_and_width_export_with_the_pruned_logits(kind, single_rank, tmp_path):
    """Calibrate, prune 8 -> 4 experts, expert width 64 -> 32, hidden 128 -> 96, a query group
    and a layer; the megatron model of the plan and the export in stock from_pretrained agree."""
    hf, arch, shard = moe_shard(kind)
    imp = calibrate(shard, batches_forward_loop(shard, [batch(arch.vocab_size, seed=s)
                                                        for s in (1, 2)], None))
    plan = make_plan(arch, imp, Targets(num_experts=4, ffn_hidden_size=32, hidden_size=96,
                                        num_attention_heads=2, num_query_groups=1, num_layers=3))
    for pos, layer in enumerate(plan.layers):
        assert plan.experts[pos] == top_k(imp.experts[layer], 4)
    tgt = plan.target
    assert (tgt.num_experts, tgt.moe_top_k, tgt.ffn_hidden_size) == (4, 2, 32)
    src = per_expert(hf.state_dict(), arch)
    tensors = apply_plan(plan, src)
    assert set(tensors) == set(canonical_keys(tgt))
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))).experts == plan.experts
    b = batch(arch.vocab_size)
    pruned = build_shard(tgt)
    load_state(pruned, tensors.__getitem__)
    ours = logits_of(pruned, b)
    _, back, theirs = exported(tmp_path / "pruned", tgt, tensors, b["tokens"])
    assert sum(p.numel() for p in back.parameters()) == tgt.num_params()
    delta = (ours - theirs).abs().max().item()
    assert delta <= TOL, f"{kind}: max |dlogit| = {delta}"
    # new expert 1 of new layer 2 is what the plan kept of its source expert, router rows too
    old_layer, old_e = plan.layers[2], plan.experts[2][1]
    hid, ffn = torch.tensor(plan.hidden), torch.tensor(plan.ffn[2])
    down = f"model.layers.2.{expert_keys(arch, 1)[2]}"
    assert torch.equal(tensors[down], src[f"model.layers.{old_layer}.{expert_keys(arch, old_e)[2]}"][hid][:, ffn])
    router = src[f"model.layers.{old_layer}.{router_key(arch)}"]
    assert torch.equal(tensors[f"model.layers.2.{router_key(arch)}"], router[plan.experts[2]][:, hid])


def test_expert_targets_are_refused_naming_the_field():
    arch = arch_from_hf_config(tiny_hf("mixtral").config)
    with pytest.raises(ValueError, match=re.escape("prune.target.num_experts=1 must be in [moe_top_k=2, 8]")):
        Targets(num_experts=1).resolve(arch)
    with pytest.raises(ValueError, match=re.escape("prune.target.num_experts=9 must be in")):
        Targets(num_experts=9).resolve(arch)
    dense = arch_from_hf_config(tiny_hf("gqa").config)
    with pytest.raises(ValueError, match=re.escape("prune.target.num_experts=4: the source model has no experts")):
        Targets(num_experts=4).resolve(dense)
    keep = dict(hidden=list(range(128)), ffn=list(range(64)), groups=[0, 1], heads=[0, 1, 2, 3],
                layers=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=re.escape("keeps 1 experts per layer but tokens are routed to moe_top_k=2")):
        Plan(arch, **keep, experts=[3])


# ------------------------------------------------------------------ multi-rank (one launch)
@pytest.fixture(scope="module")
def multi_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe")
    tiny_corpus(tmp / "corpus")
    for kind in KINDS:
        hf = tiny_hf(kind)
        arch = arch_from_hf_config(hf.config)
        ckpt.save(tmp / kind, arch, per_expert(hf.state_dict(), arch), tokenizer=tiny_tokenizer())
        b = batch(arch.vocab_size, s=32)
        with torch.no_grad():
            logits = hf(b["tokens"]).logits
        torch.save({"batches": [b], "logits": logits}, tmp / f"{kind}.pt")
    return tmp, torchrun("moe", 2, tmp, tmp / "corpus")


@pytest.mark.multirank
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["ep2", "tp2", "pp2"])
def test_multi_rank_logit_parity(multi_rank, kind, layout):
    _, rows = multi_rank
    mine = [r for r in rows if r["family"] == kind and r["layout"] == layout]
    deltas = [r["max_dlogit"] for r in mine if r["max_dlogit"] is not None]
    assert deltas and max(deltas) <= TOL, f"{kind} {layout}: {deltas}"
    assert {r["local_experts"] for r in mine} == {4 if layout == "ep2" else 8}


@pytest.mark.multirank
@pytest.mark.parametrize("kind", KINDS)
def test_expert_parallel_save_gathers_every_expert(multi_rank, kind):
    tmp, _ = multi_rank
    src, got = ckpt.Checkpoint(tmp / kind), ckpt.Checkpoint(tmp / f"{kind}_ep2")
    assert got.arch == src.arch and set(got.keys()) == set(src.keys())
    for k in src.keys():
        assert torch.equal(got.get(k), src.get(k)), k


@pytest.mark.multirank
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["ep2", "tp2"])
def test_parallel_prune_keeps_what_one_process_keeps(multi_rank, kind, layout, single_rank):
    """`prune` at EP=2 (calibration batches split over the two data-parallel ranks, experts over
    the two expert-parallel ranks) and at TP=2 (each expert's width split over the two ranks: its
    output norms taken from the summed partial outputs, its neurons gathered) plans and writes
    what one process does with all batches."""
    tmp, rows = multi_rank
    job = prune_job(tmp, kind, tmp / "corpus", ep=1)
    c = ckpt.Checkpoint(tmp / kind)
    hf, arch, shard = moe_shard(kind)
    data = PackedSequences(tmp / "corpus", 32, split="train", valid_fraction=0.1)
    imp = calibrate(shard, batches_forward_loop(shard, data.batches(2, num_batches=4), None))
    plan = make_plan(arch, imp, Targets(num_experts=4, ffn_hidden_size=32, hidden_size=96))
    got = Plan.load(Path(tmp) / f"{kind}_pruned_{layout}" / "plan.json")
    assert (got.experts, got.ffn, got.hidden) == (plan.experts, plan.ffn, plan.hidden)
    assert got.experts != [list(range(4))] * arch.num_layers  # chosen, not the first four
    out = ckpt.Checkpoint(job.output.replace("ep1", layout))
    ref = apply_plan(plan, c.get)
    assert out.arch == plan.target and set(out.keys()) == set(ref)
    for k, v in ref.items():
        assert torch.allclose(out.get(k), v, atol=1e-6), k
    row = next(r for r in rows if r["layout"] == f"prune_{layout}" and r["family"] == kind)
    assert row["target_active"] == plan.target.num_active_params() < row["target_params"]


def test_search_space_budgets_active_parameters():
    """search.count=active measures candidates by router + top-k experts; the experts axis
    never goes below top-k."""
    from nemo_minitron.search.space import Space, enumerate_candidates

    arch = arch_from_hf_config(tiny_hf("mixtral").config)
    for count, measure in (("active", Arch.num_active_params), ("total", Arch.num_params)):
        space = Space(budget=0.6, count=count, hidden_multiple=32, ffn_multiple=16)
        found = enumerate_candidates(arch, space)
        budget = 0.6 * measure(arch)
        assert found
        for c in found:
            a = arch.replace(**c.target)
            assert abs(measure(a) - budget) <= 0.05 * budget + 1
            assert (c.params, c.active) == (a.num_params(), a.num_active_params())
        assert {c.target["num_experts"] for c in found} <= set(range(4, 9))
    with pytest.raises(ValueError, match=re.escape("search.num_experts=[1, 8]: every token is routed")):
        enumerate_candidates(arch, Space(budget=0.6, num_experts=[1, 8]))


def test_search_ranks_moe_candidates_by_active_parameters(tmp_path, single_rank):
    """`search` with count=active on a tiny Mixtral: candidates pruned (experts, width, ...),
    distilled from the MoE teacher and ranked; the report lists experts and active parameters."""
    from nemo_minitron.config.schema import SearchConfig, SearchJob
    from nemo_minitron.search.run import run_search
    from tests.test_search_run import common

    hf = tiny_hf("mixtral")
    arch = arch_from_hf_config(hf.config)
    ckpt.save(tmp_path / "teacher", arch, per_expert(hf.state_dict(), arch), tokenizer=tiny_tokenizer())
    tiny_corpus(tmp_path / "corpus", n_docs=50)
    job = SearchJob(**common(tmp_path), output=str(tmp_path / "s"), search=SearchConfig(
        budget=0.7, tolerance=0.08, count="active", hidden_multiple=32, ffn_multiple=16,
        max_candidates=2, steps=2))
    res = run_search(job)
    assert res["count"] == "active" and res["source_params"] == arch.num_active_params()
    assert sorted(r["rank"] for r in res["results"]) == [1, 2]
    for r in res["results"]:
        assert abs(r["active"] - 0.7 * arch.num_active_params()) <= 0.08 * 0.7 * arch.num_active_params()
        assert r["active"] == arch.replace(**r["target"]).num_active_params()
        assert r["val_loss"] == r["val_loss"]  # distilled, finite
    report = (tmp_path / "s" / "search.md").read_text()
    assert "active parameters" in report and "| experts | active |" in report
    # the MoE students' distillation logs report expert load at every step
    logged = metrics(tmp_path / "s" / "cand_0" / "distill")
    steps = [r for r in logged if "loss" in r]
    assert len(steps) == 2 and all(r["moe_max_load"] >= 1 >= r["moe_min_load"] for r in steps)


def test_load_balance_figures():
    from nemo_minitron.runtime.routing import load_balance

    even = load_balance(torch.tensor([[5.0, 5.0, 5.0, 5.0]]))
    assert even == {"moe_max_load": 1.0, "moe_min_load": 1.0, "moe_load_cv": 0.0}
    skew = load_balance(torch.tensor([[10.0, 6.0, 4.0, 0.0], [5.0, 5.0, 5.0, 5.0]]))
    assert (skew["moe_max_load"], skew["moe_min_load"]) == (2.0, 0.0)
    assert skew["moe_load_cv"] == pytest.approx(torch.tensor([10.0, 6, 4, 0]).std(unbiased=False).item() / 5 / 2)


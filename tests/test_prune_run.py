"""The prune stage end to end: the same plan and pruned weights at TP=2, PP=2 and DP=2 as a
single-process reference built from calibrate + make_plan + apply_plan."""

import json

import pytest
import torch

from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.data.packed import PackedSequences
from nemo_minitron.importance.calibrate import batches_forward_loop, calibrate
from nemo_minitron.pruning.apply import apply_plan
from nemo_minitron.pruning.plan import Plan
from nemo_minitron.pruning.select import Targets, make_plan
from nemo_minitron.runtime.shard import build_shard, load_state

from tests.helpers import tiny_corpus, tiny_hf, tiny_tokenizer, torchrun

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, single_rank):
    tmp = tmp_path_factory.mktemp("prune")
    hf = tiny_hf("qwen2")  # GQA + QKV bias + untied
    arch = arch_from_hf_config(hf.config)
    ckpt.save(tmp / "ckpt", arch, hf.state_dict(), tokenizer=tiny_tokenizer())
    tiny_corpus(tmp / "corpus")
    rows = torchrun("prune_layouts", 2, tmp / "ckpt", tmp / "corpus", tmp)
    # reference: one process, same calibration batches, same selection, plain slicing
    shard = build_shard(arch)
    load_state(shard, hf.state_dict().__getitem__)
    data = PackedSequences(tmp / "corpus", 32, split="train", valid_fraction=0.1)
    imp = calibrate(shard, batches_forward_loop(shard, data.batches(2, num_batches=4), None))
    # one whole query group kept (both its heads), not one head per group: the two heads of a
    # group share K/V and score alike at random init (4e-7 apart, below the layouts' round-off
    # differences), while the groups' scores are >= 0.4% apart, so every layout picks the same
    plan = make_plan(arch, imp, Targets(hidden_size=96, ffn_hidden_size=160,
                                        num_attention_heads=2, num_query_groups=1, num_layers=3))
    return tmp, rows, plan, apply_plan(plan, hf.state_dict())


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_same_plan_and_weights_at_every_layout(pruned, layout):
    tmp, rows, plan, ref = pruned
    out = tmp / layout
    got = Plan.load(out / "plan.json")
    assert (got.hidden, got.layers, got.ffn, got.heads, got.groups) == (
        plan.hidden, plan.layers, plan.ffn, plan.heads, plan.groups)
    c = ckpt.Checkpoint(out)
    assert c.arch == plan.target and set(c.keys()) == set(ref)
    for k, v in ref.items():
        assert torch.allclose(c.get(k), v), k
    assert c.meta["stage"] == "prune" and (out / "importance.png").stat().st_size > 10_000
    row = next(r for r in rows if r["layout"] == layout)
    assert row["target_params"] == plan.target.num_params() < row["source_params"]
    assert len(row["dropped_layers"]) == 1


def test_pruned_tiny_exports_and_loads(pruned, tmp_path):
    from transformers import AutoModelForCausalLM

    from nemo_minitron.convert.hf import export_hf

    tmp, _, plan, ref = pruned
    out = export_hf(str(tmp / "tp2"), tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["hidden_size"] == 96 and cfg["head_dim"] == 32
    m = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in m.parameters()) == plan.target.num_params()

"""Candidate enumeration around a parameter budget, selection and rank agreement."""

import pytest

from nemo_minitron.arch import Arch
from nemo_minitron.search.rank import kendall_tau, rank_results
from nemo_minitron.search.space import Space, axis_values, enumerate_candidates, select

# SmolLM2-135M's shape (tied embeddings, 9 heads in 3 query groups).
SMOL = Arch(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9,
            num_query_groups=3, head_dim=64, vocab_size=49152, tie_embeddings=True)
# Llama-3.1-8B's shape.
LLAMA8B = Arch(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
               num_query_groups=8, head_dim=128, vocab_size=128256)


def test_candidates_lie_in_the_band_and_are_valid():
    space = Space(budget=0.6, tolerance=0.05)
    cands = enumerate_candidates(SMOL, space)
    budget = 0.6 * SMOL.num_params()
    assert len(cands) > 20
    seen = set()
    for c in cands:
        arch = SMOL.replace(**c.target)
        assert arch.num_params() == c.params
        assert abs(c.params - budget) <= 0.05 * budget
        assert arch.num_attention_heads % arch.num_query_groups == 0
        assert arch.heads_per_group <= SMOL.heads_per_group
        assert arch.num_layers >= 15 and arch.hidden_size >= 288 and arch.ffn_hidden_size >= 384
        assert arch.hidden_size % 64 == 0 or arch.hidden_size == 576
        assert arch.ffn_hidden_size % 128 == 0
        key = tuple(c.target.values())
        assert key not in seen
        seen.add(key)
    dist = [abs(c.params - budget) for c in cands]
    assert dist == sorted(dist)  # nearest the budget first
    assert [c.index for c in cands] == list(range(len(cands)))


def test_tensor_and_pipeline_parallel_constraints():
    space = Space(budget=0.5, tolerance=0.04, hidden_multiple=256, ffn_multiple=512, layer_step=4)
    cands = enumerate_candidates(LLAMA8B, space, tp=8, pp=2)
    assert cands
    for c in cands:
        t = c.target
        assert t["num_attention_heads"] % 8 == 0 and t["num_query_groups"] % 8 == 0
        assert t["ffn_hidden_size"] % 8 == 0 and t["num_layers"] % 2 == 0
    # at tp=8, groups must stay 8 (the source has 8): heads 32, 24, 16 are the only options
    assert {c.target["num_query_groups"] for c in cands} == {8}
    assert {c.target["num_attention_heads"] for c in cands} <= {16, 24, 32}


def test_non_embedding_budget_and_absolute_budget():
    space = Space(budget=50e6, count_embeddings=False, tolerance=0.05)
    cands = enumerate_candidates(SMOL, space)
    assert cands and all(abs(c.non_embedding - 50e6) <= 2.5e6 for c in cands)
    with pytest.raises(ValueError, match="source has"):
        enumerate_candidates(SMOL, Space(budget=200e6))


def test_axes_and_explicit_values():
    width = enumerate_candidates(SMOL, Space(budget=0.6, axes=("hidden_size", "ffn_hidden_size"),
                                             tolerance=0.1))
    assert width and all(c.target["num_layers"] == 30 and c.target["num_attention_heads"] == 9
                         for c in width)
    vals = axis_values(SMOL, Space(budget=0.6, num_layers=[20, 24], hidden_size=[512]))
    assert vals["num_layers"] == [20, 24] and vals["hidden_size"] == [512]
    assert (6, 2) in vals["attention"] and (6, 3) in vals["attention"] and (4, 1) not in vals["attention"]
    with pytest.raises(ValueError, match="cannot grow"):
        axis_values(SMOL, Space(budget=0.6, hidden_size=[640]))
    with pytest.raises(ValueError, match="unknown"):
        axis_values(SMOL, Space(budget=0.6, axes=("width",)))


def test_select_spreads_over_depths():
    cands = enumerate_candidates(SMOL, Space(budget=0.6))
    picked = select(cands, 6)
    depths = [c.target["num_layers"] for c in picked]
    assert len(picked) == 6 and len(set(depths)) == 6  # six different depths before repeats
    assert select(cands, 1)[0].index == 0  # one candidate: the nearest overall
    assert len(select(cands, 1000)) == len(cands)


def test_rank_and_kendall():
    rows = [{"index": 0, "val_loss": 3.0, "confirm_loss": 2.5}, {"index": 1, "val_loss": 2.0},
            {"index": 2, "val_loss": None}, {"index": 3, "val_loss": 2.5, "confirm_loss": 2.6}]
    out = rank_results(rows, "val_loss")
    assert [r["index"] for r in out] == [1, 3, 0, 2]
    assert [r.get("rank") for r in out] == [1, 2, 3, None]
    assert out[2]["confirm_rank"] == 1 and out[1]["confirm_rank"] == 2
    acc = [{"index": 0, "val_tasks": {"piqa": 0.6}}, {"index": 1, "val_tasks": {"piqa": 0.7}}]
    assert [r["index"] for r in rank_results(acc, "piqa")] == [1, 0]
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)


# A tiny Qwen2-MoE's shape: 8 routed experts of width 64 (top-2) and a shared expert of width 96.
QWEN2_MOE = Arch(num_layers=4, hidden_size=128, ffn_hidden_size=64, num_attention_heads=4,
                 num_query_groups=2, head_dim=32, vocab_size=1000, qkv_bias=True,
                 model_type="qwen2_moe", num_experts=8, moe_top_k=2, moe_renorm=True,
                 moe_shared_expert_intermediate_size=96)


MOE_AXES = ["ffn_hidden_size", "num_experts"]
SHARED = "moe_shared_expert_intermediate_size"


@pytest.mark.parametrize("count", ["active", "total"])
def test_shared_expert_width_is_a_search_axis(count):
    """Candidates of a source with a shared expert vary its width (in the name and the target,
    so prune slices it); their total and active counts are the analytic ones of the pruned
    shape, and one shared neuron fewer costs 3 * hidden parameters per layer in both."""
    space = Space(budget=0.8, count=count, ffn_multiple=16, axes=MOE_AXES + [SHARED])
    assert axis_values(QWEN2_MOE, space)[SHARED] == [32, 48, 64, 80, 96]  # down to a quarter
    cands = enumerate_candidates(QWEN2_MOE, space)
    budget = 0.8 * (QWEN2_MOE.num_active_params() if count == "active" else QWEN2_MOE.num_params())
    assert {c.target.moe_shared_expert_intermediate_size for c in cands} == {32, 48, 64, 80, 96}
    for c in cands:
        a = QWEN2_MOE.replace(**c.target)
        s = a.moe_shared_expert_intermediate_size
        assert c.name().endswith(f"-S{s}") and (c.params, c.active) == (
            a.num_params(), a.num_active_params())
        assert abs((c.active if count == "active" else c.params) - budget) <= 0.05 * budget
        full = a.replace(moe_shared_expert_intermediate_size=96)
        for n in (Arch.num_params, Arch.num_active_params):
            assert n(full) - n(a) == 4 * 3 * 128 * (96 - s)
    fixed = enumerate_candidates(QWEN2_MOE, Space(budget=0.8, count=count, ffn_multiple=16,
                                                  axes=MOE_AXES))
    assert fixed and {c.target.moe_shared_expert_intermediate_size for c in fixed} == {96}


def test_shared_expert_width_reaches_active_budgets_experts_cannot():
    """Every token passes through the shared expert: at 70% of the active parameters, expert
    count and width alone find no candidate, the shared width axis does."""
    def found(axes):
        return enumerate_candidates(QWEN2_MOE, Space(budget=0.7, count="active", ffn_multiple=16,
                                                     axes=axes))
    assert found(MOE_AXES) == [] and found(MOE_AXES + [SHARED])


def test_shared_expert_width_refusals():
    """Explicit widths: within the source's; refused for a source without a shared expert."""
    moe = QWEN2_MOE.replace(model_type="mixtral", qkv_bias=False,
                            moe_shared_expert_intermediate_size=0)
    assert axis_values(moe, Space(budget=0.7))["moe_shared_expert_intermediate_size"] == [0]
    assert all(c.target.moe_shared_expert_intermediate_size is None
               for c in enumerate_candidates(moe, Space(budget=0.8, ffn_multiple=16)))
    with pytest.raises(ValueError, match="search.moe_shared_expert_intermediate_size=.*no shared"):
        axis_values(moe, Space(budget=0.7, moe_shared_expert_intermediate_size=[48]))
    with pytest.raises(ValueError, match=r"search.moe_shared_expert_intermediate_size=\[48, 128\]"):
        axis_values(QWEN2_MOE, Space(budget=0.7, moe_shared_expert_intermediate_size=[48, 128]))
    assert axis_values(QWEN2_MOE, Space(budget=0.7, moe_shared_expert_intermediate_size=[
        96, 48]))["moe_shared_expert_intermediate_size"] == [48, 96]

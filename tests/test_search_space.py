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

"""Choosing what to keep: targets validation, depth selection, width selection from scores."""

import pytest
import torch

from nemo_minitron.arch import Arch
from nemo_minitron.importance.reduce import Importance
from nemo_minitron.pruning.select import Targets, make_plan, random_importance, select_layers

ARCH = Arch(num_layers=6, hidden_size=8, ffn_hidden_size=6, num_attention_heads=4,
            num_query_groups=2, head_dim=2, vocab_size=32)


def imp_with(ffn=None, heads=None, hidden=None, block=None):
    z = random_importance(ARCH, 0)
    return Importance(ffn if ffn is not None else z.ffn, heads if heads is not None else z.heads,
                      hidden if hidden is not None else z.hidden,
                      block if block is not None else z.block)


def test_targets_validation_messages():
    with pytest.raises(ValueError, match=r"prune.target.hidden_size=16 must be in \[1, 8\]"):
        Targets(hidden_size=16).resolve(ARCH)
    with pytest.raises(ValueError, match="num_attention_heads=3 is not a multiple of"):
        Targets(num_attention_heads=3, num_query_groups=2).resolve(ARCH)
    with pytest.raises(ValueError, match="keep more groups"):
        Targets(num_attention_heads=4, num_query_groups=1).resolve(ARCH)  # 4 heads/group > 2
    assert Targets(num_attention_heads=2).resolve(ARCH).num_attention_heads == 2


def test_select_layers_contiguous_and_scattered():
    block = torch.tensor([0.9, 0.1, 0.2, 0.05, 0.8, 0.3])
    assert select_layers(block, 4, contiguous=True) == [0, 1, 4, 5]  # window [2,3] sums 0.25
    assert select_layers(block, 4, contiguous=False) == [0, 2, 4, 5]
    assert select_layers(block, 6) == list(range(6))


def test_width_keeps_the_highest_scores():
    hidden = torch.tensor([5.0, 1, 7, 0, 3, 9, 2, 4])
    ffn = torch.arange(36, dtype=torch.float).reshape(6, 6).flip(1)  # neuron 0 best in every layer
    ffn[2] = torch.tensor([0.0, 1, 2, 3, 4, 5])  # layer 2 prefers the last neurons
    heads = torch.tensor([[1.0, 2, 10, 20]] * 6)  # group 1 (heads 2,3) dominates
    heads[5] = torch.tensor([9.0, 1, 3, 2])  # layer 5: group 0 has 10, group 1 has 5
    plan = make_plan(ARCH, imp_with(ffn=ffn, heads=heads, hidden=hidden),
                     Targets(hidden_size=4, ffn_hidden_size=2, num_attention_heads=1,
                             num_query_groups=1))
    assert plan.hidden == [0, 2, 5, 7]
    assert plan.ffn[0] == [0, 1] and plan.ffn[2] == [4, 5]
    assert plan.groups[0] == [1] and plan.heads[0] == [3]
    assert plan.groups[5] == [0] and plan.heads[5] == [0]
    assert plan.target.hidden_size == 4 and plan.target.num_query_groups == 1


def test_heads_uniform_per_group_and_explicit_layers():
    plan = make_plan(ARCH, random_importance(ARCH, 3), Targets(num_attention_heads=2),
                     keep_layers=[5, 0, 2])
    assert plan.layers == [0, 2, 5]
    for groups, heads in zip(plan.groups, plan.heads):
        assert groups == [0, 1] and [h // 2 for h in heads] == [0, 1]
    with pytest.raises(ValueError, match=r"must lie in \[0, 6\)"):
        make_plan(ARCH, random_importance(ARCH, 3), Targets(), keep_layers=[0, 6])


def test_random_importance_is_seeded():
    a, b, c = random_importance(ARCH, 1), random_importance(ARCH, 1), random_importance(ARCH, 2)
    assert torch.equal(a.ffn, b.ffn) and not torch.equal(a.ffn, c.ffn)

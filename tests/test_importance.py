"""Importance: score functions on hand-made tensors, hooks against transformers, and the same
global scores at TP=1, TP=2, PP=2 and DP=2."""

import math

import pytest
import torch

from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.importance.calibrate import batches_forward_loop, calibrate
from nemo_minitron.importance.reduce import Importance
from nemo_minitron.importance.scores import (Moments, batch_aggregate, block_importance,
                                             group_scores, head_norms, sequence_aggregate)
from nemo_minitron.runtime.shard import build_shard, load_state

from tests.helpers import tiny_hf, torchrun


# ---------------------------------------------------------------- pure score functions
def test_sequence_aggregates():
    x = torch.tensor([[[1.0, -2.0], [3.0, 2.0]]])  # batch 1, seq 2, K 2
    assert torch.allclose(sequence_aggregate(x, "mean_abs"), torch.tensor([[2.0, 2.0]]))
    assert torch.allclose(sequence_aggregate(x, "mean"), torch.tensor([[2.0, 0.0]]))
    assert torch.allclose(sequence_aggregate(x, "l2"), torch.tensor([[math.sqrt(10), math.sqrt(8)]]))
    assert torch.allclose(sequence_aggregate(x, "var"), torch.tensor([[1.0, 4.0]]))
    with pytest.raises(ValueError, match="mean_abs"):
        sequence_aggregate(x, "max")


def test_batch_aggregates_from_moments_combine_additively():
    a, b = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[5.0, 4.0]])
    m1, m2 = Moments.zeros(2), Moments.zeros(2)
    m1.add(a)
    m2.add(b)
    both = Moments.from_flat(m1.flat() + m2.flat())  # what an all-reduce does
    allv = torch.cat([a, b]).double()
    assert torch.allclose(batch_aggregate(both, "l2"), allv.pow(2).sum(0).sqrt())
    assert torch.allclose(batch_aggregate(both, "mean"), allv.mean(0))
    assert torch.allclose(batch_aggregate(both, "var"), allv.var(0, unbiased=False))


def test_head_norms_block_importance_group_scores():
    x = torch.zeros(1, 1, 6)
    x[0, 0, :3] = torch.tensor([3.0, 4.0, 0.0])  # head 0 (d=3): norm 5; head 1: 0
    assert torch.allclose(head_norms(x, 3), torch.tensor([[[5.0, 0.0]]]))
    h = torch.randn(2, 5, 8)
    assert torch.allclose(block_importance(h, h), torch.zeros(2, 1), atol=1e-6)
    assert torch.allclose(block_importance(h, -h), torch.full((2, 1), 2.0), atol=1e-6)
    assert torch.equal(group_scores(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 2), torch.tensor([[3.0, 7.0]]))


# ---------------------------------------------------------------- hooks against transformers
def calib_batches(n=4, b=2, s=24, vocab=1000, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, vocab, (b, s), generator=g),
             "position_ids": torch.arange(s).expand(b, s)} for _ in range(n)]


def hf_reference(hf, batches):
    """The same statistics taken with plain hooks on the transformers model."""
    acts = {"ffn": {}, "heads": {}, "norms": [], "block": {}}
    hs = []
    d = hf.config.head_dim
    for i, layer in enumerate(hf.model.layers):
        hs.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, i=i: acts["ffn"].setdefault(i, []).append(a[0])))
        hs.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, i=i: acts["heads"].setdefault(i, []).append(head_norms(a[0], d))))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            hs.append(norm.register_forward_hook(lambda m, a, o: acts["norms"].append(o)))
    hs.append(hf.model.norm.register_forward_hook(lambda m, a, o: acts["norms"].append(o)))
    with torch.no_grad():
        outs = [hf(b["tokens"], output_hidden_states=True).hidden_states for b in batches]
    for h in hs:
        h.remove()
    l2 = lambda xs: torch.cat([x.abs().mean(1) for x in xs]).pow(2).sum(0).sqrt()
    L = len(hf.model.layers)
    ffn = torch.stack([l2(acts["ffn"][i]) for i in range(L)])
    heads = torch.stack([l2(acts["heads"][i]) for i in range(L)])
    n = len(acts["norms"]) // len(batches)
    hidden = sum(l2([acts["norms"][j * n + k] for j in range(len(batches))]) for k in range(n))
    # hidden_states[i+1] after the last layer is post-norm in HF: compare blocks 0..L-2 only
    block = torch.stack([torch.cat([block_importance(o[i], o[i + 1]) for o in outs]).mean()
                         for i in range(L - 1)])
    return ffn, heads, hidden, block


def test_hooks_match_transformers_statistics(single_rank):
    hf = tiny_hf("gqa")
    arch = arch_from_hf_config(hf.config)
    shard = build_shard(arch)
    load_state(shard, hf.state_dict().__getitem__)
    batches = calib_batches()
    imp = calibrate(shard, batches_forward_loop(shard, batches, None))
    ffn, heads, hidden, block = hf_reference(hf, batches)
    assert imp.meta["samples"] == 8
    assert torch.allclose(imp.ffn, ffn, rtol=1e-4, atol=1e-6)
    assert torch.allclose(imp.heads, heads, rtol=1e-4, atol=1e-6)
    assert torch.allclose(imp.hidden, hidden, rtol=1e-4, atol=1e-5)
    assert torch.allclose(imp.block[:-1], block, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- layouts
@pytest.fixture(scope="module")
def layouts(tmp_path_factory, single_rank):
    tmp = tmp_path_factory.mktemp("imp")
    hf = tiny_hf("gqa")
    arch = arch_from_hf_config(hf.config)
    ckpt.save(tmp / "ckpt", arch, hf.state_dict())
    batches = calib_batches(n=4)
    torch.save(batches, tmp / "batches.pt")
    shard = build_shard(arch)
    load_state(shard, hf.state_dict().__getitem__)
    ref = calibrate(shard, batches_forward_loop(shard, batches, None))
    rows = torchrun("importance", 2, tmp / "ckpt", tmp / "batches.pt", tmp)
    return tmp, ref, rows


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_same_importance_at_every_layout(layouts, layout):
    tmp, ref, rows = layouts
    assert all(r["samples"] == 8 for r in rows if r["layout"] == layout)
    for rank in (0, 1):
        got = Importance.load(tmp / f"{layout}-rank{rank}.safetensors")
        for axis in ("ffn", "heads", "hidden", "block"):
            assert torch.allclose(getattr(got, axis), getattr(ref, axis), rtol=1e-4, atol=1e-6), \
                f"{layout} rank {rank}: {axis}"


# ---------------------------------------------------------------- norms fused into the next linear
class _FusedNormLinear(torch.nn.Module):
    """CPU stand-in for Transformer Engine's ``LayerNormLinear``: the norm runs inside the linear,
    whose module carries ``layer_norm_weight`` and the config (as megatron's TE wrapper does)."""

    def __init__(self, norm, linear, config):
        super().__init__()
        self.norm, self.linear, self.config = norm, linear, config
        self.layer_norm_weight = norm.weight

    def forward(self, x, *args, **kwargs):
        return self.linear(self.norm(x), *args, **kwargs)


def test_hooks_capture_norms_fused_into_the_linear(single_rank):
    """The TE spec replaces input_layernorm/pre_mlp_layernorm by IdentityOp and fuses the norm
    into linear_qkv/linear_fc1: the hidden-axis statistics must not change."""
    from megatron.core.transformer.identity_op import IdentityOp

    hf = tiny_hf("gqa")
    shard = build_shard(arch_from_hf_config(hf.config))
    load_state(shard, hf.state_dict().__getitem__)
    batches = calib_batches(n=2)
    ref = calibrate(shard, batches_forward_loop(shard, batches, None))
    for layer in shard.model.decoder.layers:
        attn, mlp = layer.self_attention, layer.mlp
        attn.linear_qkv = _FusedNormLinear(layer.input_layernorm, attn.linear_qkv, shard.config)
        mlp.linear_fc1 = _FusedNormLinear(layer.pre_mlp_layernorm, mlp.linear_fc1, shard.config)
        layer.input_layernorm, layer.pre_mlp_layernorm = IdentityOp(), IdentityOp()
    fused = calibrate(shard, batches_forward_loop(shard, batches, None))
    for axis in ("ffn", "heads", "hidden", "block"):
        assert torch.allclose(getattr(fused, axis), getattr(ref, axis), rtol=1e-5, atol=1e-6), axis
    assert ref.hidden.abs().sum() > 0

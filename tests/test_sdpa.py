"""The fused attention of the local spec computes what megatron's unfused DotProductAttention
computes (values and gradients, fp32 and bf16), and is the one the built model uses."""

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.runtime.sdpa import SDPAttention
from nemo_minitron.runtime.shard import build_shard
from nemo_minitron.runtime.shared_context import mask_from_segments

from tests.helpers import tiny_hf


@pytest.mark.parametrize("masked", [False, True])  # True: a shared-context mask (True = hidden)
@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_sdpa_matches_megatron_attention(single_rank, dtype, tol, masked):
    arch = arch_from_hf_config(tiny_hf("gqa").config)  # GQA: 4 heads over 2 query groups
    shard = build_shard(arch, dtype)
    core = shard.model.decoder.layers[0].self_attention.core_attention
    assert type(core) is SDPAttention
    s, b, dt = 24, 2, next(shard.model.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, arch.num_attention_heads, arch.head_dim, generator=g).to(dt)
    k, v = (torch.randn(s, b, arch.num_query_groups, arch.head_dim, generator=g).to(dt)
            for _ in range(2))
    mask = None
    if masked:
        seg = torch.tensor([0] * 8 + [1] * 5 + [2] * 7 + [-1] * 4)
        mask = mask_from_segments(torch.stack([seg, seg.roll(3)]))
    outs = []
    for fwd in (SDPAttention.forward, DotProductAttention.forward):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = fwd(core, qq, kk, vv, mask)
        out.float().square().sum().backward()
        outs.append([out.float()] + [x.grad.float() for x in (qq, kk, vv)])
    assert outs[0][0].shape == (s, b, arch.num_attention_heads * arch.head_dim)
    for a, ref in zip(*outs):
        assert (a - ref).abs().max().item() <= tol * ref.abs().max().item()

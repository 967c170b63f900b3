"""The cached-table rotary embedding of runtime/rope.py is what the built model uses, and a whole
forward and backward through it equals megatron-core's own RoPE path bit for bit (fp32 and bf16,
full and partial rotary), so the losses of every stage are unchanged by it."""

import pytest
import torch
from megatron.core.transformer import attention

from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.runtime import rope
from nemo_minitron.runtime.shard import build_shard, load_state

from tests.helpers import batch, tiny_hf


def logits_and_grads(shard, b):
    shard.model.zero_grad(set_to_none=True)
    logits = shard.model(b["tokens"], b["position_ids"], None)
    logits.float().square().mean().backward()
    return [logits.detach()] + [p.grad.clone() for p in shard.model.parameters()]


@pytest.mark.parametrize("kind", ["gqa", "nemotron"])  # nemotron: half of each head rotates
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_rope_equals_megatron_bitwise(kind, dtype, single_rank, monkeypatch):
    hf = tiny_hf(kind)
    arch = arch_from_hf_config(hf.config)
    shard = build_shard(arch, dtype)
    assert attention.apply_rotary_pos_emb is rope.apply_rotary_pos_emb
    load_state(shard, hf.state_dict().__getitem__)
    b = batch(arch.vocab_size)
    rope._TABLES.clear()
    ours = logits_and_grads(shard, b)
    assert len(rope._TABLES) == 1, "one table for all layers, queries and keys"
    assert next(iter(rope._TABLES.values()))[1] is not None, "the plain case took the fast path"
    monkeypatch.setattr(attention, "apply_rotary_pos_emb", rope._ORIGINAL)
    ref = logits_and_grads(shard, b)
    assert len(ours) == len(ref) > 1
    for a, r in zip(ours, ref):
        assert torch.equal(a, r)

"""Our megatron-core runtime reproduces transformers' logits (fp32) on every architecture variant."""

import pytest
import torch

from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.runtime.forward import gather_logits, run_forward
from nemo_minitron.runtime.shard import build_shard, gather_canonical, load_state

from tests.helpers import batch, tiny_hf

KINDS = ["gqa", "tied", "head_dim", "llama3_rope", "qwen2", "qwen3", "nemotron", "llama_pruned"]


def loaded(kind):
    """A tiny HF model of ``kind``, its architecture, and our model holding its weights."""
    hf = tiny_hf(kind)
    arch = arch_from_hf_config(hf.config)
    shard = build_shard(arch)
    load_state(shard, hf.state_dict().__getitem__)
    return hf, arch, shard


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(kind, single_rank):
    hf, arch, shard = loaded(kind)
    b = batch(arch.vocab_size)
    ours = run_forward(shard, [b], lambda lg, _: {"logits": gather_logits(lg, arch.vocab_size)})
    with torch.no_grad():
        ref = hf(b["tokens"]).logits
    delta = (ours[0]["logits"] - ref).abs().max().item()
    assert delta <= 1e-4, f"{kind}: max |dlogit| = {delta}"


@pytest.mark.parametrize("kind", ["gqa", "qwen2", "qwen3"])
def test_weights_round_trip_through_model(kind, single_rank):
    hf, arch, shard = loaded(kind)
    sd = hf.state_dict()
    back = gather_canonical(shard)
    assert set(back) == {k for k in sd if not (arch.tie_embeddings and k == "lm_head.weight")}
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k


def test_llama3_rope_scaling_is_applied(single_rank):
    """A Llama-3.1 scaled model differs from the same weights without scaling: the path is live."""
    hf = tiny_hf("llama3_rope")
    arch = arch_from_hf_config(hf.config)
    assert arch.rope_scaling["rope_type"] == "llama3" and arch.rope_theta == 500000.0
    from nemo_minitron.runtime.model import rope_inv_freq

    plain = rope_inv_freq(arch.replace(rope_scaling=None))
    scaled = rope_inv_freq(arch)
    assert not torch.allclose(plain, scaled)
    assert torch.allclose(scaled, hf.model.rotary_emb.inv_freq.float())


def test_progress_bar_counts_every_micro_batch(single_rank, capsys):
    """The bar ends at n/n: megatron draws exactly n micro-batches, so a bar over the iterator
    stopped at n-1 (calibration and every evaluation ended reading 3/4 or 1/2)."""
    _, arch, shard = loaded("gqa")
    b = batch(arch.vocab_size)
    run_forward(shard, [b, b, b], lambda _lg, _b: {}, progress="fwd")
    err = capsys.readouterr().err
    assert "fwd: 100%" in err and "3/3" in err, err

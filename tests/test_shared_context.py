"""A context's continuations in one row (runtime/shared_context.py, evaluate/rows.py): the mask,
RoPE at the given position ids (against transformers, which always reads them), the packed rows,
and scores equal to one row per continuation."""

import pytest
import torch

from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.evaluate.multiple_choice import score_continuations
from nemo_minitron.evaluate.rows import build_rows, make_batch
from nemo_minitron.runtime import rope
from nemo_minitron.runtime.shard import build_shard, load_state
from nemo_minitron.runtime.shared_context import (mask_from_segments, rope_follows_position_ids,
                                                  supported)

from tests.helpers import tiny_hf


def test_mask_from_segments():
    seg = torch.tensor([[0, 0, 1, 1, 2, -1]])
    hidden = mask_from_segments(seg)
    assert hidden.shape == (1, 1, 6, 6) and hidden.dtype == torch.bool
    sees = [[k for k in range(6) if not hidden[0, 0, q, k]] for q in range(6)]
    assert sees == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 4], [0, 1, 5]]


@pytest.mark.parametrize("kind", ["gqa", "nemotron"])  # nemotron: half of each head rotates
def test_rope_follows_position_ids_as_transformers_does(kind, single_rank):
    hf = tiny_hf(kind)
    arch = arch_from_hf_config(hf.config)
    shard = build_shard(arch, "fp32")
    load_state(shard, hf.state_dict().__getitem__)
    shard.model.eval()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, arch.vocab_size, (2, 12), generator=g)
    pos = torch.stack([torch.arange(12), torch.tensor([0, 1, 2, 3, 4, 4, 5, 6, 4, 5, 9, 10])])
    with torch.no_grad():
        ref = hf(tokens, position_ids=pos).logits
        rope._TABLES.clear()
        with rope_follows_position_ids(shard.model):
            ours = shard.model(tokens, pos, None)[..., :arch.vocab_size]
        plain = shard.model(tokens, pos, None)[..., :arch.vocab_size]
    assert next(iter(rope._TABLES.values()))[1] is not None, "per-row tables took the fast path"
    err = (ours - ref).abs().max().item()
    assert err <= 1e-5
    assert torch.allclose(plain[0], ours[0], atol=1e-6)  # row 0's positions are its indices
    # megatron alone reads indices, not the ids: row 1 then differs far beyond rounding
    assert (plain[1] - ref[1]).abs().max().item() > max(100 * err, 1e-3)
    assert "forward" not in vars(shard.model)  # restored


def requests():
    """Contexts with several continuations (some repeated, some one token long), a context with
    one continuation, and a long context that needs left truncation at max_length=16."""
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(2, 90, (n,), generator=g).tolist()  # noqa: E731
    ctx_a, ctx_b, long = ids(10), ids(5), ids(30)
    conts = [ids(4), ids(3), ids(1), ids(4), ids(2)]
    reqs = [(ctx_a, c) for c in conts] + [(ctx_a, conts[0]), (ctx_b, ids(3)),
                                          (ctx_b, [conts[2][0]]), (list(long), ids(3)),
                                          (list(long), ids(2)), (ctx_b, ids(6))]
    return reqs


@pytest.mark.parametrize("max_length", [64, 16])  # 16: rows split, one request truncated
def test_rows_read_each_continuation_where_its_own_row_would(max_length):
    reqs = requests()
    rows = build_rows(reqs, max_length, share=True)
    plain = build_rows(reqs, max_length, share=False)
    assert sum(len(r.tokens) for r in rows) < sum(len(r.tokens) for r in plain)
    seen = set()
    for row in rows:
        assert len(row.tokens) <= max_length
        pos = row.positions or list(range(len(row.tokens)))
        for req, cont, at in row.owners:
            seen.add(req)
            ctx = reqs[req][0]
            want = (ctx + cont)[-(max_length + 1):][:-1]
            # the tokens and positions this continuation is read from, and what each one sees
            assert len(at) == len(cont)
            start = len(want) - len(cont)
            assert [pos[p] for p in at] == list(range(start, len(want)))
            assert row.tokens[at[-1]] == want[-1]
            last = at[-1]
            seg = row.segments
            visible = [k for k in range(last + 1)
                       if seg is None or seg[k] == 0 or seg[k] == seg[last]]
            assert [row.tokens[k] for k in visible] == want
    assert seen == set(range(len(reqs)))
    if max_length == 16:
        assert any(r.segments is None and len(r.tokens) == 16 for r in rows)  # truncated


@pytest.mark.parametrize("kind", ["gqa", "llama3_rope", "qwen2"])
@pytest.mark.parametrize("max_length", [64, 16])
def test_shared_rows_score_as_separate_rows(kind, max_length, single_rank):
    hf = tiny_hf(kind)
    arch = arch_from_hf_config(hf.config)
    shard = build_shard(arch, "fp32")
    load_state(shard, hf.state_dict().__getitem__)
    assert supported(shard.model)
    reqs = requests()
    kw = dict(micro_batch_size=3, max_length=max_length, progress=False)
    shared = score_continuations(shard, reqs, share_context=True, **kw)
    plain = score_continuations(shard, reqs, share_context=False, **kw)
    auto = score_continuations(shard, reqs, **kw)
    assert max(abs(a[0] - b[0]) for a, b in zip(shared, plain)) <= 1e-5
    assert [a[1] for a in shared] == [b[1] for b in plain]
    assert auto == shared
    b = make_batch(build_rows(reqs, max_length, share=True), [0, 1, 2], 64, 0)
    assert b["attention_mask"].shape == (3, 1, 64, 64)


def test_unsupported_attention_keeps_separate_rows(single_rank, monkeypatch):
    hf = tiny_hf("gqa")
    shard = build_shard(arch_from_hf_config(hf.config), "fp32")
    assert supported(shard.model)
    monkeypatch.setattr(shard.model.config, "window_size", (4, 0))
    assert not supported(shard.model)
    monkeypatch.undo()
    core = shard.model.decoder.layers[0].self_attention
    monkeypatch.setattr(core, "core_attention", torch.nn.Identity())  # e.g. Transformer Engine's
    assert not supported(shard.model)

"""Distillation losses against straightforward float64 references (values and gradients), plus a
2-rank gloo run where the vocabulary is split over TP=2 (tests/workers/kl_tp.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from nemo_minitron.distill import losses as L

from tests.helpers import torchrun

B, S, V = 2, 15, 96  # 30 tokens, vocabulary 96 (true vocabulary 90 where padding is tested)


def make(seed=0, v=V, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, S, v, generator=g) * scale).to(dtype).requires_grad_()
    t = (torch.randn(B, S, v, generator=g) * scale).to(dtype)
    mask = (torch.rand(B, S, generator=g) > 0.3).float()
    mask[0, 0] = 0.0
    return s, t, mask


def ref_kl(s, t, *, temperature=1.0, mask=None, vocab_size=None, top_k=None, kind="forward",
           beta=0.5):
    """float64, full vocabulary, no tricks. top-k: gather the teacher's k best ids for both."""
    s, t = s.double(), t.double()
    if vocab_size is not None:
        s, t = s[..., :vocab_size], t[..., :vocab_size]
    if top_k is not None:
        idx = t.topk(top_k, dim=-1).indices
        s, t = s.gather(-1, idx), t.gather(-1, idx)
    ls, lt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    ps, pt = ls.exp(), lt.exp()
    if kind == "forward":
        kl = (pt * (lt - ls)).sum(-1)
    elif kind == "reverse":
        kl = (ps * (ls - lt)).sum(-1)
    else:
        lm = (beta * pt + (1 - beta) * ps).log()
        kl = beta * (pt * (lt - lm)).sum(-1) + (1 - beta) * (ps * (ls - lm)).sum(-1)
    kl = kl * temperature ** 2
    w = torch.ones_like(kl) if mask is None else mask.double()
    return (kl * w).sum(), w.sum()


def value_and_grad(fn, x):
    if x.grad is not None:
        x.grad = None
    val, cnt = fn(x)
    val.backward()
    return val.detach().double(), cnt, x.grad.detach().double().clone()


def assert_close(a, b, tol=1e-5, what=""):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    err = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} (scale {scale:.3g})"


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_kinds_match_reference(kind, temperature):
    s, t, mask = make(1)
    got, cnt, g = value_and_grad(lambda x: L.logits_kl(x, t, temperature=temperature, mask=mask,
                                                        kind=kind), s)
    ref, rcnt, rg = value_and_grad(lambda x: ref_kl(x, t, temperature=temperature, mask=mask,
                                                     kind=kind), s)
    assert got.item() > 0
    assert_close(got, ref, 1e-5, "value")
    assert_close(g, rg, 1e-5, "grad")
    assert cnt.item() == rcnt.item() == mask.sum().item()
    assert g[mask == 0].abs().max().item() == 0.0  # masked tokens get no gradient


def test_jsd_beta_and_symmetry():
    s, t, mask = make(2)
    for beta in (0.1, 0.7):
        got, _, g = value_and_grad(lambda x: L.logits_kl(x, t, mask=mask, kind="jsd", beta=beta), s)
        ref, _, rg = value_and_grad(lambda x: ref_kl(x, t, mask=mask, kind="jsd", beta=beta), s)
        assert_close(got, ref, 1e-5, f"jsd beta={beta}")
        assert_close(g, rg, 1e-5, f"jsd grad beta={beta}")
    # beta = 0.5 is the symmetric JSD, bounded by log 2 per token
    with torch.no_grad():
        a, _ = L.logits_kl(s, t, kind="jsd")
        b, _ = L.logits_kl(t, s, kind="jsd")
    assert abs(a.item() - b.item()) < 1e-4 and a.item() <= B * S * math.log(2)


def test_temperature_scaling_is_t_squared():
    """Explicit Hinton factor: loss(T) = T^2 * KL(softmax(s/T) || ...) = T^2 * loss_{T=1}(s/T)."""
    s, t, _ = make(3)
    with torch.no_grad():
        at_t, _ = L.logits_kl(s, t, temperature=4.0)
        plain, _ = L.logits_kl(s / 4.0, t / 4.0, temperature=1.0)
    assert_close(at_t, 16.0 * plain, 1e-5, "T^2 factor")
    # and the gradient magnitude stays O(1) in T: d/ds of T^2 KL(s/T) = T (p_S - p_T)
    _, _, g = value_and_grad(lambda x: L.logits_kl(x, t, temperature=4.0), s)
    with torch.no_grad():
        expect = 4.0 * (F.softmax(s / 4.0, -1) - F.softmax(t / 4.0, -1))
    assert_close(g, expect.double(), 1e-5, "grad = T^2 * (p_S - p_T) / T")


def test_top_k_definition():
    s, t, mask = make(4)
    k = 5
    got, _, g = value_and_grad(lambda x: L.logits_kl(x, t, mask=mask, top_k=k, temperature=2.0), s)
    ref, _, rg = value_and_grad(lambda x: ref_kl(x, t, mask=mask, top_k=k, temperature=2.0), s)
    assert_close(got, ref, 1e-5, "top-k value")
    assert_close(g, rg, 1e-5, "top-k grad")
    # only the teacher's top-k ids receive gradient, and per token it sums to 0 (renormalised)
    outside = torch.ones_like(t, dtype=torch.bool).scatter_(-1, t.topk(k, -1).indices, False)
    assert g[outside].abs().max().item() == 0.0
    assert g.sum(-1).abs().max().item() < 1e-6
    # explicit definition on one token: k-point distributions renormalised over the ids
    i, j = 1, 3
    ids = t[i, j].topk(k).indices
    pt = F.softmax(t[i, j, ids].double() / 2, -1)
    ps = F.softmax(s[i, j, ids].double() / 2, -1)
    one, _ = L.logits_kl(s[i, j].detach(), t[i, j], top_k=k, temperature=2.0)
    assert_close(one, 4.0 * (pt * (pt.log() - ps.log())).sum(), 1e-6, "one token")
    # k >= vocabulary: the full loss
    with torch.no_grad():
        full, _ = L.logits_kl(s, t, mask=mask)
        big, _ = L.logits_kl(s, t, mask=mask, top_k=10 * V)
    assert_close(big, full, 1e-6, "k >= V")


def test_padded_vocab_is_masked():
    s, t, mask = make(5)
    with torch.no_grad():  # huge values in the padding columns must change nothing
        s[..., 90:] = 50.0
    t = t.clone()
    t[..., 90:] = 80.0
    for kw in ({}, {"top_k": 7}, {"kind": "reverse"}, {"kind": "jsd"}):
        got, _, g = value_and_grad(lambda x: L.logits_kl(x, t, mask=mask, vocab_size=90, **kw), s)
        ref, _, rg = value_and_grad(lambda x: ref_kl(x, t, mask=mask, vocab_size=90, **kw), s)
        assert torch.isfinite(got) and torch.isfinite(g).all()
        assert_close(got, ref, 1e-5, f"padded {kw}")
        assert_close(g, rg, 1e-5, f"padded grad {kw}")
        assert g[..., 90:].abs().max().item() == 0.0
    # different paddings of student and teacher (TP=1): compared over the true vocabulary only
    got, _ = L.logits_kl(s.detach(), t[..., :92], mask=mask, vocab_size=90)
    ref, _ = ref_kl(s.detach(), t, mask=mask, vocab_size=90)
    assert_close(got, ref, 1e-5, "different paddings")
    with pytest.raises(ValueError, match="padded differently"):
        L.logits_kl(s, t[..., :92])


@pytest.mark.parametrize("kw", [{}, {"top_k": 6, "temperature": 1.5}, {"kind": "reverse"},
                                {"kind": "jsd", "beta": 0.3}, {"vocab_size": 90}])
def test_chunked_equals_unchunked(kw):
    s, t, mask = make(6)
    whole, cw, gw = value_and_grad(lambda x: L.logits_kl(x, t, mask=mask, **kw), s)
    for chunk in (1, 7, 16, 1000):  # ragged last chunk, one token, more than all
        got, cnt, g = value_and_grad(lambda x: L.logits_kl(x, t, mask=mask, chunk_tokens=chunk, **kw), s)
        assert_close(got, whole, 2e-6, f"chunk={chunk}")
        assert_close(g, gw, 1e-6, f"grad chunk={chunk}")
        assert cnt.item() == cw.item()


def test_bf16_inputs_computed_in_fp32():
    s32, t32, mask = make(7)
    s16 = s32.detach().bfloat16().requires_grad_()
    t16 = t32.bfloat16()
    val, cnt = L.logits_kl(s16, t16, mask=mask, temperature=2.0, chunk_tokens=8)
    val.backward()
    assert val.dtype == torch.float32 and cnt.dtype == torch.float32
    assert s16.grad.dtype == torch.bfloat16
    # the same bf16 values upcast: fp32 math gives (almost) the same loss
    sr = s16.detach().float().requires_grad_()
    ref, _, rg = value_and_grad(lambda x: ref_kl(x, t16.float(), mask=mask, temperature=2.0), sr)
    assert_close(val, ref, 1e-5, "bf16 value")
    assert_close(s16.grad, rg, 1e-2, "bf16 grad (bf16-rounded)")
    # and close to the loss of the original fp32 logits
    full, _ = ref_kl(s32.detach(), t32, mask=mask, temperature=2.0)
    assert abs(val.item() - full.item()) < 0.02 * full.item()


def test_teacher_gets_no_gradient_and_no_grad_mode(monkeypatch):
    s, t, mask = make(8)
    calls = []
    kernel = L._kl_chunk

    def spy(*a, **kw):
        calls.append(kw["want_grad"])
        return kernel(*a, **kw)

    monkeypatch.setattr(L, "_kl_chunk", spy)
    with torch.no_grad():  # evaluation: no gradient is computed even though s requires grad
        L.logits_kl(s, t, mask=mask, chunk_tokens=10)
    assert calls == [False] * 3
    t.requires_grad_()
    val, _ = L.logits_kl(s, t, mask=mask)
    val.backward()
    assert t.grad is None and s.grad is not None
    with torch.no_grad():
        again, _ = L.logits_kl(s, t, mask=mask, chunk_tokens=4)
    assert_close(again, val.detach(), 2e-6, "no_grad")
    # a loss scaled downstream scales the gradient; a second backward is refused
    s.grad = None
    val, _ = L.logits_kl(s, t, mask=mask)
    (3.0 * val).backward(retain_graph=True)
    _, _, g1 = value_and_grad(lambda x: L.logits_kl(x, t, mask=mask), s.detach().clone().requires_grad_())
    assert_close(s.grad, 3.0 * g1, 1e-6, "scaled upstream grad")
    with pytest.raises(RuntimeError, match="twice"):
        val.backward()


def test_argument_checks():
    s, t, mask = make(9)
    with pytest.raises(ValueError, match="kind"):
        L.logits_kl(s, t, kind="kl")
    with pytest.raises(ValueError, match="temperature"):
        L.logits_kl(s, t, temperature=0)
    with pytest.raises(ValueError, match="top_k"):
        L.logits_kl(s, t, top_k=0)
    with pytest.raises(ValueError, match="mask shape"):
        L.logits_kl(s, t, mask=mask[:, :3])
    empty = torch.zeros(0, V, requires_grad=True)  # a micro-batch without tokens: 0 and 0
    val, cnt = L.logits_kl(empty, torch.zeros(0, V), chunk_tokens=4)
    val.backward()
    assert val.item() == 0.0 and cnt.item() == 0.0 and empty.grad.shape == (0, V)


def test_lm_loss_matches_cross_entropy():
    s, _, mask = make(10)
    g = torch.Generator().manual_seed(11)
    labels = torch.randint(0, 90, (B, S), generator=g)
    labels[mask == 0] = -100  # ignored positions may hold anything
    with torch.no_grad():
        s[..., 90:] = 40.0  # padding columns must not enter the normaliser

    def ref(x):
        lab = labels.clamp(min=0)
        ce = F.cross_entropy(x.double()[..., :90].flatten(0, 1), lab.flatten(), reduction="none")
        return (ce * mask.flatten().double()).sum(), mask.sum()

    for chunk in (None, 7):
        got, cnt, gr = value_and_grad(lambda x: L.lm_loss(x, labels, mask=mask, vocab_size=90,
                                                          chunk_tokens=chunk), s)
        r, _, rg = value_and_grad(ref, s)
        assert_close(got, r, 1e-5, f"lm value chunk={chunk}")
        assert_close(gr, rg, 1e-5, f"lm grad chunk={chunk}")
        assert cnt.item() == mask.sum().item()


def _fused_setup(seed, v=V, h=24, ht=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, S, h, generator=g).to(dtype).requires_grad_()
    ws = (torch.randn(v, h, generator=g) * 0.5).to(dtype).requires_grad_()
    hidden_t = torch.randn(B, S, ht, generator=g).to(dtype)
    wt = (torch.randn(v, ht, generator=g) * 0.5).to(dtype)
    mask = (torch.rand(B, S, generator=g) > 0.3).float()
    return hs, ws, hidden_t, wt, mask


@pytest.mark.parametrize("kw", [{}, {"top_k": 5, "temperature": 2.0}, {"kind": "jsd"},
                                {"vocab_size": 90, "kind": "reverse"}])
def test_fused_output_kl_matches_materialised_logits(kw):
    hs, ws, ht, wt, mask = _fused_setup(12)

    def ref():
        return ref_kl(hs @ ws.t(), ht @ wt.t(), mask=mask, **kw)[0]

    r = ref()
    r.backward()
    rgh, rgw = hs.grad.clone(), ws.grad.clone()
    for chunk in (None, 4, 13):
        hs.grad = ws.grad = None
        val, cnt = L.fused_output_kl(hs, ws, ht, wt, mask=mask, chunk_tokens=chunk, **kw)
        val.backward()
        assert_close(val, r, 1e-5, f"fused value chunk={chunk}")
        assert_close(hs.grad, rgh, 1e-5, "fused grad hidden")
        assert_close(ws.grad, rgw, 1e-5, "fused grad weight")
        assert cnt.item() == mask.sum().item()


@pytest.mark.parametrize("group_bytes", [None, 2 * V * 7])
def test_fused_bf16_weight_grad_follows_fp32(group_bytes, monkeypatch):
    """bf16 weights: the chunks' logit gradients go into one bf16 weight-gradient matmul, or (a
    small buffer of 7 rows against chunks of 3) into several whose products are summed in fp32."""
    if group_bytes is not None:
        monkeypatch.setattr(L, "_GRAD_W_BYTES", group_bytes)
    hs, ws, ht, wt, mask = _fused_setup(13, dtype=torch.bfloat16)
    val, _ = L.fused_output_kl(hs, ws, ht, wt, mask=mask, chunk_tokens=3)
    val.backward()
    assert ws.grad.dtype == torch.bfloat16 and hs.grad.dtype == torch.bfloat16
    hs32 = hs.detach().float().requires_grad_()
    ws32 = ws.detach().float().requires_grad_()
    r, _ = ref_kl(hs32 @ ws32.t(), ht.float() @ wt.float().t(), mask=mask)
    r.backward()
    assert abs(val.item() - r.item()) < 0.02 * r.item()
    assert_close(ws.grad, ws32.grad, 2e-2, "bf16 weight grad")
    assert_close(hs.grad, hs32.grad, 2e-2, "bf16 hidden grad")


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_hidden_state_loss(kind):
    g = torch.Generator().manual_seed(14)
    hs = torch.randn(B, S, 16, generator=g, requires_grad=True)
    ht = torch.randn(B, S, 24, generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.3).float()
    proj = L.make_projection(16, 24)
    val, cnt = L.hidden_state_loss(hs, ht, kind=kind, projection=proj, mask=mask)
    val.backward()
    x = hs.detach().double().requires_grad_()
    w = proj.weight.detach().double().requires_grad_()
    p = x @ w.t()
    if kind == "cosine":
        per = 1 - (p * ht.double()).sum(-1) / (p.norm(dim=-1) * ht.double().norm(dim=-1))
    else:
        per = ((p - ht.double()) ** 2).mean(-1)
    ref = (per * mask.double()).sum()
    ref.backward()
    assert_close(val, ref, 1e-5, kind)
    assert_close(hs.grad, x.grad, 1e-5, f"{kind} grad hidden")
    assert_close(proj.weight.grad, w.grad, 1e-5, f"{kind} grad projection")
    assert cnt.item() == mask.sum().item()
    # same sizes, no projection; identical states give zero loss
    zero, _ = L.hidden_state_loss(ht, ht, kind=kind)
    assert abs(zero.item()) < 1e-5
    with pytest.raises(ValueError, match="projection"):
        L.hidden_state_loss(hs, ht, kind=kind)


def test_make_projection_init():
    eye = L.make_projection(8, 8)
    assert torch.equal(eye.weight, torch.eye(8)) and eye.bias is None
    up = L.make_projection(8, 12)  # isometry: norms preserved
    x = torch.randn(5, 8)
    assert_close(up(x).norm(dim=-1), x.norm(dim=-1), 1e-5, "isometry")
    keep = torch.tensor([0, 3, 4, 9])
    sel = L.make_projection(4, 10, keep_index=keep)
    y = sel(torch.arange(1.0, 5.0).unsqueeze(0))[0]
    assert y.tolist() == [1, 0, 0, 2, 3, 0, 0, 0, 0, 4]
    with pytest.raises(ValueError):
        L.make_projection(4, 10, keep_index=torch.tensor([0, 1, 2, 10]))


def test_dynamic_weight_and_combine():
    logit = torch.tensor(2.0, requires_grad=True)
    inter = torch.tensor(0.25, requires_grad=True)
    alpha = L.dynamic_weight(logit, inter)
    assert not alpha.requires_grad and alpha.dtype == torch.float32
    assert abs(alpha.item() - 8.0) < 1e-6
    assert abs((alpha * inter).item() - logit.item()) < 1e-6  # scaled to the logit loss
    assert L.dynamic_weight(1.0, 0.0).item() > 1e7  # eps guards the division
    total = L.combine({"logits": logit, "inter": inter, "lm": torch.tensor(1.0)},
                      {"inter": alpha, "lm": 0.5})
    assert abs(total.item() - (2.0 + 8.0 * 0.25 + 0.5)) < 1e-6
    total.backward()
    assert logit.grad.item() == 1.0 and abs(inter.grad.item() - 8.0) < 1e-6
    nan = L.combine({"a": torch.tensor(1.0), "b": torch.tensor(float("nan"))}, {"b": 0.0})
    assert nan.item() == 1.0
    with pytest.raises(ValueError, match="unknown"):
        L.combine({"logits": logit}, {"logit": 1.0})


def test_check_vocab():
    assert L.check_vocab(49152, 49152, 49152, 49280) == 49152  # padding differs: fine
    with pytest.raises(ValueError) as e:
        L.check_vocab(32000, 49152, 32000, 49152)
    msg = str(e.value)
    assert "32000" in msg and "49152" in msg and "tokenizer" in msg
    with pytest.raises(ValueError, match="smaller"):
        L.check_vocab(100, 100, 99, 128)


@pytest.mark.multirank
def test_tensor_parallel_two_ranks():
    """TP=2 over gloo: values and each rank's gradient shard equal the TP=1 computation."""
    rows = torchrun("kl_tp", 2, timeout=300)
    assert len(rows) == 2 * len({r["case"] for r in rows}) and len(rows) >= 2 * 13
    for r in [r for r in rows if r["case"].startswith("cache_build")]:  # teacher top-k at TP=2
        assert r["ids_equal"] and r["logp_err"] <= 1e-5 and r["rest_err"] <= 1e-5, r
    rows = [r for r in rows if not r["case"].startswith("cache_build")]
    for r in rows:
        assert r["tp_value"] == pytest.approx(r["ref_value"], rel=1e-5, abs=1e-5), r
        assert r["grad_err"] <= 1e-5 * max(1.0, r["grad_scale"]), r
        if "grad2_err" in r:
            assert r["grad2_err"] <= 1e-5 * max(1.0, r["grad2_scale"]), r
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r["tp_value"])
    for case, vals in by_case.items():  # every TP rank reports the same loss
        assert vals[0] == pytest.approx(vals[1], rel=1e-6), case

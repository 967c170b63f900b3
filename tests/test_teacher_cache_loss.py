"""Offline teacher cache, the pure half: the loss from cached top-k equals online top-k (and the
residual-bucket KL computed by plain autograd from full logits), loss and gradient, in fp32."""

import torch

from nemo_minitron.distill import losses as L


def _logits(seed, n=2, t=7, v=50, vocab=45):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, t, v, generator=g) * 2
    te = torch.randn(n, t, v, generator=g) * 3
    mask = (torch.rand(n, t, generator=g) > 0.2).float()
    return s, te, mask, vocab


def test_renormalised_equals_online_topk():
    s, te, mask, vocab = _logits(0)
    for temp, k in ((1.0, 5), (2.0, 12)):
        a = s.clone().requires_grad_()
        ref, cnt = L.logits_kl(a, te, temperature=temp, mask=mask, vocab_size=vocab, top_k=k)
        ref.backward()
        ids, logp, rest = L.teacher_topk(te, k, temperature=temp, vocab_size=vocab, chunk_tokens=3)
        b = s.clone().requires_grad_()
        got, cnt2 = L.cached_topk_kl(b, ids, logp, rest, temperature=temp, mask=mask,
                                     vocab_size=vocab, residual=False, chunk_tokens=4)
        got.backward()
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6) and cnt == cnt2
        assert torch.allclose(b.grad, a.grad, rtol=1e-5, atol=1e-7)
        assert ref > 0


def test_residual_bucket_matches_autograd_reference():
    s, te, mask, vocab = _logits(1)
    temp, k = 1.5, 6
    # reference: the (k+1)-point KL by autograd over full fp32 log-softmaxes
    a = s.clone().requires_grad_()
    lp_s = torch.log_softmax(a[..., :vocab] / temp, -1)
    lp_t = torch.log_softmax(te[..., :vocab] / temp, -1)
    top = lp_t.topk(k, -1).indices
    inside = torch.zeros_like(lp_t, dtype=torch.bool).scatter_(-1, top, True)
    lq_r = torch.logsumexp(lp_t.masked_fill(inside, -float("inf")), -1)
    lp_r = torch.logsumexp(lp_s.masked_fill(inside, -float("inf")), -1)
    q = lp_t.gather(-1, top).exp()
    tok = (q * (lp_t.gather(-1, top) - lp_s.gather(-1, top))).sum(-1) + lq_r.exp() * (lq_r - lp_r)
    ref = (tok * mask).sum() * temp ** 2
    ref.backward()
    before = te.clone()
    ids, logp, rest = L.teacher_topk(te, k, temperature=temp, vocab_size=vocab)
    assert torch.equal(te, before)  # the teacher's logits are read, never overwritten
    assert torch.equal(ids.long().sort(-1).values, top.sort(-1).values)
    assert torch.allclose(logp.exp().sum(-1) + rest.exp(), torch.ones(()), atol=1e-6)
    b = s.clone().requires_grad_()
    got, _ = L.cached_topk_kl(b, ids, logp, rest, temperature=temp, mask=mask, vocab_size=vocab,
                              chunk_tokens=5)
    got.backward()
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(b.grad, a.grad, rtol=1e-5, atol=1e-7)
    assert b.grad[..., vocab:].abs().max() == 0  # padding columns learn nothing
    # k = the whole vocabulary: the bucket is empty and the loss is the full KL
    ids, logp, rest = L.teacher_topk(te, vocab, temperature=temp, vocab_size=vocab)
    full, _ = L.logits_kl(s, te, temperature=temp, mask=mask, vocab_size=vocab)
    got, _ = L.cached_topk_kl(s, ids, logp, rest, temperature=temp, mask=mask, vocab_size=vocab)
    assert torch.allclose(got, full, rtol=1e-5, atol=1e-5)

"""Run under torchrun with 2 ranks: the distillation losses with the vocabulary split over a TP=2
gloo group against the same losses computed on the full vocabulary (TP=1) on every rank.

The padded vocabulary is 96 (48 columns per rank), the true one 90, so rank 1 holds 6 padding
columns (given large values: they must be masked). Emits one row per rank and case.
"""

import torch
import torch.distributed as tdist

from nemo_minitron.distill import losses as L

from tests.workers._emit import emit

B, S, VP, VOCAB, H, HT = 2, 15, 96, 90, 24, 32


def data():
    g = torch.Generator().manual_seed(0)  # same seed on every rank: the same full tensors
    s = torch.randn(B, S, VP, generator=g) * 3
    t = torch.randn(B, S, VP, generator=g) * 3
    s[..., VOCAB:] = 30.0
    t[..., VOCAB:] = 60.0
    mask = (torch.rand(B, S, generator=g) > 0.3).float()
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    labels[mask == 0] = -100
    hs = torch.randn(B, S, H, generator=g)
    ws = torch.randn(VP, H, generator=g) * 0.5
    ht = torch.randn(B, S, HT, generator=g)
    wt = torch.randn(VP, HT, generator=g) * 0.5
    return s, t, mask, labels, hs, ws, ht, wt


def main():
    tdist.init_process_group("gloo")
    rank = tdist.get_rank()
    group = tdist.new_group([0, 1])
    s, t, mask, labels, hs, ws, ht, wt = data()
    lo, hi = rank * VP // 2, (rank + 1) * VP // 2

    kl_cases = {
        "forward_T2": dict(temperature=2.0),
        "forward_chunked": dict(temperature=1.0, chunk_tokens=7),
        "top_k7": dict(top_k=7, temperature=1.5),
        "top_k60_chunked": dict(top_k=60, chunk_tokens=4),  # k > columns per rank
        "reverse": dict(kind="reverse"),
        "jsd": dict(kind="jsd", beta=0.3, chunk_tokens=11),
    }
    for case, kw in kl_cases.items():
        def run(x_full, shard, group_):
            x = (x_full[..., lo:hi] if shard else x_full).detach().clone().requires_grad_()
            tt = t[..., lo:hi] if shard else t
            val, cnt = L.logits_kl(x, tt, mask=mask, tp_group=group_, vocab_size=VOCAB, **kw)
            val.backward()
            return val.item(), cnt.item(), x.grad

        ref_v, ref_c, ref_g = run(s, False, None)
        tp_v, tp_c, tp_g = run(s, True, group)
        ref_shard = ref_g[..., lo:hi]
        emit({"case": case, "rank": rank, "tp_value": tp_v, "ref_value": ref_v,
              "count": [tp_c, ref_c], "grad_err": (tp_g - ref_shard).abs().max().item(),
              "grad_scale": ref_shard.abs().max().item()})

    for case, chunk in (("lm", None), ("lm_chunked", 5)):
        def run_lm(shard, group_):
            x = (s[..., lo:hi] if shard else s).detach().clone().requires_grad_()
            val, _ = L.lm_loss(x, labels, mask=mask, tp_group=group_, vocab_size=VOCAB,
                               chunk_tokens=chunk)
            val.backward()
            return val.item(), x.grad

        ref_v, ref_g = run_lm(False, None)
        tp_v, tp_g = run_lm(True, group)
        ref_shard = ref_g[..., lo:hi]
        emit({"case": case, "rank": rank, "tp_value": tp_v, "ref_value": ref_v,
              "grad_err": (tp_g - ref_shard).abs().max().item(),
              "grad_scale": ref_shard.abs().max().item()})

    for case, kw in (("fused", dict(temperature=2.0, chunk_tokens=None)),
                     ("fused_top_k_chunked", dict(top_k=9, chunk_tokens=8))):
        def run_fused(shard, group_):
            h = hs.detach().clone().requires_grad_()
            w = (ws[lo:hi] if shard else ws).detach().clone().requires_grad_()
            val, _ = L.fused_output_kl(h, w, ht, wt[lo:hi] if shard else wt, mask=mask,
                                       tp_group=group_, vocab_size=VOCAB, **kw)
            val.backward()
            return val.item(), h.grad, w.grad

        ref_v, ref_gh, ref_gw = run_fused(False, None)
        tp_v, tp_gh, tp_gw = run_fused(True, group)
        emit({"case": case, "rank": rank, "tp_value": tp_v, "ref_value": ref_v,
              "grad_err": (tp_gw - ref_gw[lo:hi]).abs().max().item(),  # weight shard
              "grad_scale": ref_gw[lo:hi].abs().max().item(),
              "grad2_err": (tp_gh - ref_gh).abs().max().item(),  # replicated hidden
              "grad2_scale": ref_gh.abs().max().item()})
    cached(rank, group, s, t, mask, lo, hi)
    tdist.barrier()
    tdist.destroy_process_group()


def cached(rank, group, s, t, mask, lo, hi):
    """Offline cache at TP=2: the teacher's top-k built from each rank's shard equal the TP=1
    ones; the cached KL (residual bucket or renormalised) and its gradient shard equal TP=1."""
    for case, k, temp, chunk in (("cache_build_k7", 7, 1.5, 5), ("cache_build_k60", 60, 1.0, None)):
        ref = L.teacher_topk(t, k, temperature=temp, vocab_size=VOCAB, chunk_tokens=chunk)
        got = L.teacher_topk(t[..., lo:hi], k, temperature=temp, vocab_size=VOCAB,
                             chunk_tokens=chunk, tp_group=group)
        emit({"case": case, "rank": rank, "ids_equal": torch.equal(got[0], ref[0]),
              "logp_err": (got[1] - ref[1]).abs().max().item(),
              "rest_err": (got[2] - ref[2]).abs().max().item()})
    for case, k, temp, residual, chunk in (("cached_residual_k7", 7, 1.5, True, 6),
                                           ("cached_renorm_k60", 60, 1.0, False, None),
                                           ("cached_residual_all", VOCAB, 2.0, True, 9)):
        ids, logp, rest = L.teacher_topk(t, k, temperature=temp, vocab_size=VOCAB)

        def run(shard, group_):
            x = (s[..., lo:hi] if shard else s).detach().clone().requires_grad_()
            val, cnt = L.cached_topk_kl(x, ids, logp, rest, temperature=temp, mask=mask,
                                        vocab_size=VOCAB, residual=residual, tp_group=group_,
                                        chunk_tokens=chunk)
            val.backward()
            return val.item(), cnt.item(), x.grad

        ref_v, ref_c, ref_g = run(False, None)
        tp_v, tp_c, tp_g = run(True, group)
        ref_shard = ref_g[..., lo:hi]
        emit({"case": case, "rank": rank, "tp_value": tp_v, "ref_value": ref_v,
              "count": [tp_c, ref_c], "grad_err": (tp_g - ref_shard).abs().max().item(),
              "grad_scale": ref_shard.abs().max().item()})


if __name__ == "__main__":
    main()

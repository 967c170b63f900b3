"""Peak memory of the logit-distillation loss (forward + backward): naive vs chunked vs fused.

    python benchmarks/kl_memory.py [--batch 4] [--seq 256] [--vocab 49152] [--hidden 576]
                                   [--chunk 128] [--dtype fp32 bf16]

Defaults are SmolLM2 sizes (4 x 256 tokens, vocabulary 49152, hidden 576). Two settings:

A. from logits: the student logits (requiring grad) and the teacher logits already exist; we
   measure what the loss adds on top, forward and backward, including the student-logit gradient.
   naive = fp32 log-softmax of both, ``sum p_T (log p_T - log p_S)``, plain autograd;
   chunked = :func:`nemo_minitron.distill.losses.logits_kl` with ``chunk_tokens``.
B. from hidden states: only the final hidden states and the output-layer weights exist; we
   measure the output matmuls + loss + backward (gradients for hidden and weight).
   naive / chunked as above after materialising both logit tensors;
   fused = :func:`~nemo_minitron.distill.losses.fused_output_kl` (logits never materialised).

How memory is measured (CPU): the peak resident set size of this process over the region, from
Linux's ``VmHWM`` after resetting it (``echo 5 > /proc/self/clear_refs``), minus the resident size
at the start of the region. The script re-executes itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so
that glibc serves every tensor-sized block with mmap and returns it to the OS on free: the RSS
then follows the live tensor bytes (PyTorch's CPU allocator does not cache). A small warm-up of
every variant runs first so one-time library buffers are not counted.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time

ENV = "MALLOC_MMAP_THRESHOLD_"


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(fn) -> tuple[float, float]:
    """(peak bytes above the starting RSS, seconds) of ``fn()``."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    peak = _status("VmHWM") - base
    gc.collect()
    return peak, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--chunk", type=int, default=64, help="chunk_tokens of the chunked/fused losses")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = ap.parse_args()
    if os.environ.get(ENV) != "65536":
        os.environ[ENV] = "65536"
        os.execv(sys.executable, [sys.executable] + sys.argv)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch
    import torch.nn.functional as F

    from nemo_minitron.distill.losses import fused_output_kl, logits_kl

    T = args.temperature

    def naive_kl(s, t, mask):
        ls = F.log_softmax(s.float() / T if T != 1 else s.float(), dim=-1)
        lt = F.log_softmax(t.float() / T if T != 1 else t.float(), dim=-1)
        kl = (lt.exp() * (lt - ls)).sum(-1) * (T * T)
        return (kl * mask).sum()

    def chunked_kl(s, t, mask):
        return logits_kl(s, t, mask=mask, temperature=T, chunk_tokens=args.chunk)[0]

    def run(dtype_name, b, n, v, h, report=True):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        g = torch.Generator().manual_seed(0)
        hs = torch.randn(b, n, h, generator=g).to(dtype).requires_grad_()
        ht = torch.randn(b, n, h, generator=g).to(dtype)
        ws = (torch.randn(v, h, generator=g) * h ** -0.5).to(dtype).requires_grad_()
        wt = (torch.randn(v, h, generator=g) * h ** -0.5).to(dtype)
        mask = torch.ones(b, n)
        with torch.no_grad():
            s_logits = (hs @ ws.t()).requires_grad_()
            t_logits = ht @ wt.t()
        res, vals = {}, {}

        def from_logits(loss_fn, key):
            def go():
                loss = loss_fn(s_logits, t_logits, mask)
                loss.backward()
                vals[key] = loss.item()
            return go

        def from_hidden(loss_fn, key):
            def go():
                if loss_fn is None:
                    loss = fused_output_kl(hs, ws, ht, wt, mask=mask, temperature=T,
                                           chunk_tokens=args.chunk)[0]
                else:
                    s = hs @ ws.t()
                    with torch.no_grad():
                        t = ht @ wt.t()
                    loss = loss_fn(s, t, mask)
                loss.backward()
                vals[key] = loss.item()
            return go

        cases = [("A naive", from_logits(naive_kl, "A naive")),
                 ("A chunked", from_logits(chunked_kl, "A chunked")),
                 ("B naive", from_hidden(naive_kl, "B naive")),
                 ("B chunked", from_hidden(chunked_kl, "B chunked")),
                 ("B fused", from_hidden(None, "B fused"))]
        for name, fn in cases:
            s_logits.grad = hs.grad = ws.grad = None
            if name.startswith("B"):  # the logits of setting A are not part of setting B
                s_logits.data = torch.empty(0, dtype=dtype)
                t_logits = torch.empty(0, dtype=dtype)
            res[name] = measure(fn)
        if not report:
            return
        mib = 2 ** 20
        logit_mib = b * n * v * torch.tensor([], dtype=dtype).element_size() / mib
        print(f"\n{dtype_name}: {b}x{n} tokens, vocab {v}, hidden {h}, chunk_tokens {args.chunk}, "
              f"T={T}; one logits tensor = {logit_mib:.0f} MiB")
        print(f"{'variant':<11} {'peak MiB':>9} {'ratio':>7} {'time s':>7}  loss")
        for name, (peak, dt) in res.items():
            ref = res[name[0] + " naive"][0]
            print(f"{name:<11} {peak / mib:9.1f} {peak / ref:7.3f} {dt:7.2f}  {vals[name]:.4f}")
        a = res["A chunked"][0] / res["A naive"][0]
        f = res["B fused"][0] / res["B naive"][0]
        print(f"chunked / naive (from logits): {a:.3f} (target <= 0.25)   "
              f"fused / naive (from hidden): {f:.3f} (target <= 0.15)")

    import torch as _t

    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {_t.__version__}, "
          f"{_t.get_num_threads()} threads")
    for d in args.dtype:
        run(d, 1, 64, 4096, 64, report=False)  # warm-up: one-time buffers are not counted
        run(d, args.batch, args.seq, args.vocab, args.hidden)


if __name__ == "__main__":
    main()

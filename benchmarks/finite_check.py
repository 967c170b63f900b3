"""The training guard's per-step check that gradients are finite: float64 sum vs aminmax.

    OMP_NUM_THREADS=2 python benchmarks/finite_check.py [--params 89.4e6] [--rounds 5]

Before every optimizer step the guard (``distill/guard.py``) decides whether the step's fp32
gradient buffer holds a NaN or an infinity. It used to sum the buffer in float64, which on the
CPU first casts it to a float64 temporary; it now takes each tensor's smallest and largest
element (``_all_finite``), which reads it once. This prints the best of ``--rounds`` calls of
each over a buffer of ``--params`` fp32 values (the pipeline's student: 89.4M) and how much each
grows the peak RSS, with glibc's default allocator and with freed memory kept as ``minitron``
keeps it (``runtime/host_alloc.py``), and checks that both give the same verdicts.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from nemo_minitron.distill.guard import _all_finite
from nemo_minitron.runtime.host_alloc import keep_freed_memory


def float64_sum(tensors) -> bool:
    """What the guard did until 2026-12-02."""
    total = 0.0
    for t in tensors:
        total += float(t.sum(dtype=torch.float64))
    return total == total and abs(total) != float("inf")


def best(fn, tensors, rounds: int) -> float:
    fn(tensors)  # warm-up
    out = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(tensors)
        out = min(out, time.perf_counter() - t0)
    return out


def peak_growth_mb(fn, tensors) -> float:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(tensors)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=89.4e6)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    buf = [torch.randn(int(args.params))]
    checks = (("float64 sum", float64_sum), ("aminmax", _all_finite))
    # first, while nothing has grown the peak: what each adds to it (aminmax first: the sum's
    # temporary would otherwise set the peak)
    grown = {name: peak_growth_mb(fn, buf) for name, fn in reversed(checks)}
    print(f"{args.params / 1e6:.1f}M fp32 values, {torch.get_num_threads()} threads")
    for memory in ("glibc default", "freed memory kept"):
        if memory != "glibc default":
            keep_freed_memory()
        for name, fn in checks:
            print(f"  {memory:18s} {name:12s} {best(fn, buf, args.rounds) * 1e3:8.1f} ms per check"
                  f", peak RSS +{grown[name]:.0f} MB")
    buf[0][12345] = float("nan")
    assert not float64_sum(buf) and not _all_finite(buf)
    buf[0][12345] = float("inf")
    assert not float64_sum(buf) and not _all_finite(buf)


if __name__ == "__main__":
    main()

"""What bf16 buys on this CPU: matmul GFLOP/s in fp32 and bf16 for the shapes of a SmolLM2
distillation step, the fused attention's forward + backward time in both dtypes, and a fused gate+up
projection against two halves.

    OMP_NUM_THREADS=2 python benchmarks/matmul_dtypes.py [--reps 20]

A whole step cannot gain more from bf16 than its largest parts do, so these ratios bound the
bf16/fp32 ratio of `benchmarks/distill_step.py`.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [((1024, 576, 3072), "the teacher's fused gate+up"),
          ((1024, 576, 49152), "the output layer"),
          ((4096, 4096, 4096), "a large square matmul")]


def best_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"{'matmul':48s} {'fp32 GFLOP/s':>13s} {'bf16 GFLOP/s':>13s} {'bf16/fp32':>10s}")
    for (m, k, n), what in SHAPES:
        rate = {}
        for dt in (torch.float32, torch.bfloat16):
            a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
            reps = max(3, args.reps // 4) if m * k * n > 1e9 else args.reps
            rate[dt] = 2 * m * k * n / best_ms(lambda: a @ b, reps) / 1e6
        print(f"{m}x{k} @ {k}x{n} ({what})".ljust(48) + f" {rate[torch.float32]:13.0f} "
              f"{rate[torch.bfloat16]:13.0f} {rate[torch.bfloat16] / rate[torch.float32]:10.2f}")
    # gate+up as one [3072, 576] weight (megatron's fused fc1) or two [1536, 576] ones (transformers)
    for dt in (torch.float32, torch.bfloat16):
        x, w = torch.randn(1024, 576, dtype=dt), torch.randn(3072, 576, dtype=dt)
        w1, w2 = w[:1536].clone(), w[1536:].clone()
        fused = best_ms(lambda: F.linear(x, w), args.reps)
        split = best_ms(lambda: (F.linear(x, w1), F.linear(x, w2)), args.reps)
        print(f"gate+up {str(dt).replace('torch.', '')}: fused {fused:.2f} ms, two halves "
              f"{split:.2f} ms")
    # the teacher's attention: 4 x 256 tokens, 9 query heads over 3 key/value groups, head_dim 64
    ms = {}
    for dt in (torch.float32, torch.bfloat16):
        q = torch.randn(4, 9, 256, 64, dtype=dt, requires_grad=True)
        k, v = (torch.randn(4, 3, 256, 64, dtype=dt, requires_grad=True) for _ in range(2))

        def step():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()

        ms[dt] = best_ms(step, args.reps)
    print(f"fused attention [4, 9, 256, 64] GQA, forward + backward: fp32 {ms[torch.float32]:.1f} "
          f"ms, bf16 {ms[torch.bfloat16]:.1f} ms")


if __name__ == "__main__":
    main()

"""RMSNorm + SwiGLU forward and backward, eager vs ``torch.compile`` (inductor), per layer.

    OMP_NUM_THREADS=2 python benchmarks/compile_elementwise.py [--tokens 1024] [--hidden 576]
        [--ffn 1536] [--dtype bf16] [--rounds 3]

The elementwise work of one decoder layer of the pipeline's student (its input to the norm, and
the fused gate+up output to SwiGLU), timed eagerly and compiled, best of 30 calls per round;
prints the compile time and milliseconds per layer.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    norm = torch.nn.RMSNorm(args.hidden, eps=1e-5).to(dt)

    def layer(x, h):
        a, b = torch.chunk(h, 2, dim=-1)
        return norm(x), F.silu(a) * b

    def best(f, n=30):
        x = torch.randn(args.tokens, args.hidden, dtype=dt, requires_grad=True)
        h = torch.randn(args.tokens, 2 * args.ffn, dtype=dt, requires_grad=True)
        gx, gh = torch.randn(args.tokens, args.hidden, dtype=dt), torch.randn(args.tokens,
                                                                              args.ffn, dtype=dt)
        out = float("inf")
        for _ in range(n):
            t = time.perf_counter()
            torch.autograd.backward(list(f(x, h)), [gx, gh])
            out = min(out, time.perf_counter() - t)
        return out

    compiled = torch.compile(layer)
    t = time.perf_counter()
    best(compiled, 2)
    print(f"compile {time.perf_counter() - t:.1f} s ({torch.get_num_threads()} threads, "
          f"{args.dtype})")
    for rnd in range(args.rounds):
        print(f"round {rnd}  eager {1e3 * best(layer):.2f} ms  compiled "
              f"{1e3 * best(compiled):.2f} ms", flush=True)


if __name__ == "__main__":
    main()

"""Calibration forward with every importance hook on, against a plain forward on the same batches.

    python benchmarks/calibration_overhead.py [--batches 6] [--micro-batch 4] [--seq 256]

Uses the embedded SmolLM2-135M teacher and Wikipedia sample (scripts/setup.sh installs them).
Prints the time of each pass (best of --repeats), the ratio (target <= 1.10), and the memory
the collected statistics occupy. Results go to docs/benchmarks.md by hand, with the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from nemo_minitron import demo
    from nemo_minitron.data.packed import PackedSequences
    from nemo_minitron.importance.hooks import collecting
    from nemo_minitron.importance.reduce import reduce_stats
    from nemo_minitron.runtime import dist
    from nemo_minitron.runtime.forward import run_forward
    from nemo_minitron.runtime.shard import load_checkpoint

    dist.init(1, 1)
    shard, _ = load_checkpoint(demo.checkpoint_dir())
    data = PackedSequences(demo.dataset_prefix(), args.seq, split="train")
    batches = list(data.batches(args.micro_batch, num_batches=args.batches))

    def plain():
        run_forward(shard, batches, lambda _l, _b: {})

    def hooked():
        with torch.no_grad(), collecting(shard) as stats:
            run_forward(shard, batches, lambda _l, _b: {})
        return stats

    plain()  # warm-up
    t_plain, t_hook, stats = [], [], None
    for _ in range(args.repeats):
        t = time.perf_counter(); plain(); t_plain.append(time.perf_counter() - t)
        t = time.perf_counter(); stats = hooked(); t_hook.append(time.perf_counter() - t)
    t = time.perf_counter()
    imp = reduce_stats(stats, shard)
    t_reduce = time.perf_counter() - t
    stat_bytes = sum(m.flat().numel() * 8 for m in stats.moments.values())
    score_bytes = sum(x.numel() * x.element_size() for x in (imp.ffn, imp.heads, imp.hidden, imp.block))
    tokens = args.batches * args.micro_batch * args.seq
    p, h = min(t_plain), min(t_hook)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"SmolLM2-135M fp32, {args.batches} x {args.micro_batch} x {args.seq} tokens")
    print(f"plain forward   {p:7.2f} s  ({tokens / p:7.0f} tok/s)")
    print(f"hooked forward  {h:7.2f} s  ({tokens / h:7.0f} tok/s)")
    print(f"ratio           {h / p:7.3f}  (target <= 1.10)")
    print(f"reduce          {t_reduce * 1e3:7.1f} ms")
    print(f"statistics      {stat_bytes / 2**20:7.2f} MiB moments, {score_bytes / 2**20:.2f} MiB scores")
    dist.shutdown()


if __name__ == "__main__":
    main()

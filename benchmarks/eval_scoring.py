"""Multiple-choice scoring with the output layer at every position vs only at scored positions.

    python benchmarks/eval_scoring.py [--checkpoint PATH] [--tasks arc_easy,piqa,hellaswag]
                                      [--limit 100] [--rounds 2] [--dtype bf16]

Scores the same items both ways in one process, interleaved round by round (best of
``--rounds``), and prints seconds per task and the largest score difference. Default model: the
embedded SmolLM2-135M teacher.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--tasks", default="arc_easy,piqa,hellaswag")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    args = ap.parse_args()

    from nemo_minitron import demo
    from nemo_minitron.evaluate.multiple_choice import score_items
    from nemo_minitron.evaluate.tasks import load_task
    from nemo_minitron.runtime import dist
    from nemo_minitron.runtime import selected_logits as S
    from nemo_minitron.runtime.shard import load_checkpoint

    dist.init(1, 1)
    try:
        shard, c = load_checkpoint(args.checkpoint or demo.checkpoint_dir(), args.dtype)
        tok = c.tokenizer()
        can_skip = S._can_skip
        ways = {"full output layer": lambda gpt: False, "scored positions only": can_skip}
        best = {(t, w): float("inf") for t in args.tasks.split(",") for w in ways}
        scores = {}
        for r in range(args.rounds):
            for task in args.tasks.split(","):
                items = load_task(task, limit=args.limit)
                for way, fn in ways.items():
                    S._can_skip = fn
                    t0 = time.perf_counter()
                    scores[(task, way)] = score_items(shard, tok, items, progress=False,
                                                      micro_batch_size=args.micro_batch_size)
                    best[(task, way)] = min(best[(task, way)], time.perf_counter() - t0)
            print(f"round {r + 1}/{args.rounds} done (load {os.getloadavg()[0]:.2f})", flush=True)
        S._can_skip = can_skip
    finally:
        dist.shutdown()
    print(f"{shard.arch.num_params() / 1e6:.1f}M parameters, {args.dtype}, {args.limit} items per "
          f"task, {torch.get_num_threads()} threads, best of {args.rounds}")
    print(f"{'task':10s} {'full (s)':>9s} {'scored only (s)':>16s} {'speed-up':>9s} {'max |d score|':>14s}")
    for task in args.tasks.split(","):
        f, s = best[(task, "full output layer")], best[(task, "scored positions only")]
        d = max(abs(a - b) for x, y in zip(scores[(task, "full output layer")],
                                           scores[(task, "scored positions only")])
                for a, b in zip(x, y))
        print(f"{task:10s} {f:9.2f} {s:16.2f} {f / s:8.2f}x {d:14.2e}")


if __name__ == "__main__":
    main()

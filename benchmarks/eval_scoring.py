"""Multiple-choice scoring, two ways side by side in one process.

    python benchmarks/eval_scoring.py [--compare share|output] [--checkpoint PATH]
        [--tasks arc_easy,piqa,hellaswag] [--limit 100] [--rounds 2] [--dtype bf16]

``--compare share`` (default): one row per continuation vs every continuation of a context in one
row after a single copy of it (:mod:`nemo_minitron.evaluate.rows`). ``--compare output``: the
output layer at every position vs only at the scored ones. The same items are scored both ways,
interleaved round by round (best of ``--rounds``); prints seconds and tokens forwarded per task,
the largest score difference and how many greedy flags differ. Default model: the embedded
SmolLM2-135M teacher.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", choices=("share", "output"), default="share")
    ap.add_argument("--checkpoint")
    ap.add_argument("--tasks", default="arc_easy,piqa,hellaswag")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    args = ap.parse_args()

    from nemo_minitron import demo
    from nemo_minitron.evaluate.multiple_choice import encode_requests, score_continuations
    from nemo_minitron.evaluate.rows import build_rows
    from nemo_minitron.evaluate.tasks import load_task
    from nemo_minitron.runtime import dist
    from nemo_minitron.runtime import selected_logits as S
    from nemo_minitron.runtime.shard import load_checkpoint

    tasks = args.tasks.split(",")
    if args.compare == "share":
        ways = {"one row per choice": dict(share=False), "shared context": dict(share=True)}
    else:
        ways = {"full output layer": dict(skip=lambda gpt: False),
                "scored positions only": dict(skip=S._can_skip)}
    dist.init(1, 1)
    try:
        shard, c = load_checkpoint(args.checkpoint or demo.checkpoint_dir(), args.dtype)
        tok = c.tokenizer()
        max_length = shard.arch.max_position_embeddings
        encoded = {t: encode_requests(tok, [r for it in load_task(t, limit=args.limit)
                                            for r in it.requests()]) for t in tasks}
        can_skip = S._can_skip
        best = {(t, w): float("inf") for t in tasks for w in ways}
        scores, tokens = {}, {}
        for r in range(args.rounds):
            for task in tasks:
                for way, opt in ways.items():
                    S._can_skip = opt.get("skip", can_skip)
                    share = opt.get("share")
                    t0 = time.perf_counter()
                    scores[(task, way)] = score_continuations(
                        shard, encoded[task], micro_batch_size=args.micro_batch_size,
                        progress=False, share_context=share)
                    best[(task, way)] = min(best[(task, way)], time.perf_counter() - t0)
                    tokens[(task, way)] = sum(len(row.tokens) for row in build_rows(
                        encoded[task], max_length, bool(share)))
                    S._can_skip = can_skip
            print(f"round {r + 1}/{args.rounds} done (load {os.getloadavg()[0]:.2f})", flush=True)
    finally:
        dist.shutdown()
    a, b = ways
    print(f"{shard.arch.num_params() / 1e6:.1f}M parameters, {args.dtype}, {args.limit} items per "
          f"task, {torch.get_num_threads()} threads, best of {args.rounds}")
    print(f"{'task':10s} {'requests':>8s} | {a + ' s':>22s} {'tokens':>7s} | {b + ' s':>22s} "
          f"{'tokens':>7s} | {'speed-up':>8s} {'max |d logp|':>12s} {'greedy diff':>11s}")
    for task in tasks:
        x, y = scores[(task, a)], scores[(task, b)]
        d = max(abs(p[0] - q[0]) for p, q in zip(x, y))
        flips = sum(p[1] != q[1] for p, q in zip(x, y))
        ta, tb = best[(task, a)], best[(task, b)]
        print(f"{task:10s} {len(x):8d} | {ta:22.2f} {tokens[(task, a)]:7d} | {tb:22.2f} "
              f"{tokens[(task, b)]:7d} | {ta / tb:7.2f}x {d:12.2e} {flips:11d}")


if __name__ == "__main__":
    main()

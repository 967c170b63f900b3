"""Multiple-choice scoring time by micro-batch size, interleaved round by round in one process.

    OMP_NUM_THREADS=2 python benchmarks/eval_micro_batch.py [--task sciq] [--limit 200]
        [--sizes 4,8,16,32] [--rounds 2] [--dtype bf16] [--checkpoint PATH]

Scores the same items of one task at each ``eval.task_batch_size`` (rows per micro-batch) and
prints seconds and acc_norm per size and round. Default model: the embedded SmolLM2-135M teacher.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="sciq")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--sizes", default="4,8,16,32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--checkpoint")
    args = ap.parse_args()

    from nemo_minitron import demo
    from nemo_minitron.convert.checkpoint import Checkpoint
    from nemo_minitron.evaluate.multiple_choice import evaluate_tasks
    from nemo_minitron.runtime import dist
    from nemo_minitron.runtime.host_alloc import keep_freed_memory
    from nemo_minitron.runtime.shard import load_checkpoint

    keep_freed_memory()  # as `minitron` runs
    path = args.checkpoint or demo.checkpoint_dir()
    dist.init(1, 1, 0, 600)
    shard, _ = load_checkpoint(path, args.dtype)
    tok = Checkpoint(path).tokenizer()
    print(f"{args.task}, {args.limit} items, {args.dtype}, {torch.get_num_threads()} threads")
    for rnd in range(args.rounds):
        for mb in (int(x) for x in args.sizes.split(",")):
            t = time.perf_counter()
            r = evaluate_tasks(shard, tok, [args.task], limit=args.limit, micro_batch_size=mb,
                               progress=False)
            print(f"round {rnd}  rows/micro-batch {mb:3d}  {time.perf_counter() - t:7.2f} s  "
                  f"acc_norm {r['results'][args.task]['acc_norm']:.3f}", flush=True)
    dist.release()


if __name__ == "__main__":
    main()

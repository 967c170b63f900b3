"""`minitron search` with the shared teacher cache (search.teacher_cache=auto) vs without (off):
CPU seconds and how often the teacher runs.

    python benchmarks/teacher_cache_search.py --scores runs/half/importance.safetensors [--steps 2]
        [--gbs 2] [--mbs 1] [--seq 128] [--candidates 6] [--out DIR] [extra key=value ...]

Both modes run side by side, each `minitron search` in its own process with one torch thread,
on the embedded SmolLM2-135M with the same candidates, steps and batches; the calibration is
shared (prune.scores, e.g. from `minitron prune`) so what differs is the teacher's work. Printed
per mode: the process's CPU seconds (its own and its waited-for children's: comparable under
other load, unlike wall time), peak RSS, and the teacher's forward calls (micro-batches) and
tokens, counted with a forward hook on every model loaded from the teacher checkpoint (the
live teacher in each candidate's distillation, or the one cache build).
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cache_bench import cpu_seconds, peak_rss_mb, run_child


def count_teacher_forwards(teacher: Path) -> dict:
    """Wrap the checkpoint loaders of distillation and cache build so that every model loaded
    from ``teacher`` counts its forward calls and tokens into the returned dict."""
    from nemo_minitron.distill import teacher_cache, trainer

    counts = {"forwards": 0, "tokens": 0}

    def hook(module, args, kwargs, output):
        tokens = args[0] if args else kwargs.get("input_ids")
        counts["forwards"] += 1
        counts["tokens"] += tokens.numel() if tokens is not None else 0

    def wrap(load):
        def counted(path, *a, **kw):
            out = load(path, *a, **kw)
            if Path(path).resolve() == teacher:
                out[0].model.register_forward_hook(hook, with_kwargs=True)
            return out
        return counted

    for module in (trainer, teacher_cache):
        module.load_checkpoint = wrap(module.load_checkpoint)
    return counts


def one(args, mode: str, extra: list[str]) -> dict:
    from nemo_minitron.assets import cache_dir
    from nemo_minitron.cli.main import main as cli

    teacher = (cache_dir() / "checkpoints" / "smollm2-135m-instruct").resolve()
    counts = count_teacher_forwards(teacher)
    cli(["search", f"search.teacher_cache={mode}", f"search.max_candidates={args.candidates}",
         f"search.steps={args.steps}", f"prune.scores={Path(args.scores).resolve()}",
         f"data.seq_length={args.seq}", f"train.global_batch_size={args.gbs}",
         f"train.micro_batch_size={args.mbs}", "train.eval_batches=1", "train.save_interval=0",
         "train.log_interval=1", "train.warmup_steps=1", "eval.num_batches=1",
         f"eval.micro_batch_size={args.mbs}",
         f"output={Path(args.out) / mode}", *extra])
    evals = sorted((Path(args.out) / mode).glob("cand_*/eval.json"))
    return {**counts, "cpu_s": cpu_seconds(children=True), "peak_rss_mb": peak_rss_mb(),
            "val_loss": {f.parent.name: json.loads(f.read_text())["loss"] for f in evals}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--scores", required=True, help="importance.safetensors of a `minitron prune` run")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--gbs", type=int, default=2)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--candidates", type=int, default=6)
    p.add_argument("--out", default="runs/teacher_cache_search")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args, extra = p.parse_known_args()
    args.out = str(Path(args.out).resolve())
    if args.one:
        print("RESULT " + json.dumps(one(args, args.one, extra)), flush=True)
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    modes = ["auto", "off"]
    run = lambda m: run_child(__file__, m, Path(args.out) / f"{m}.json")  # noqa: E731
    res = dict(zip(modes, ThreadPoolExecutor(2).map(run, modes)))
    print(f"\nminitron search, {args.candidates} candidates x {args.steps} steps x {args.gbs} x "
          f"{args.seq} tokens, one torch thread per process\n")
    print("| search.teacher_cache | CPU s | teacher forwards (micro-batches) | teacher tokens | "
          "peak RSS MB | wall s |")
    print("|---|---|---|---|---|---|")
    for m in modes:
        r = res[m]
        print(f"| {m} | {r['cpu_s']:.0f} | {r['forwards']} | {r['tokens']} | "
              f"{r['peak_rss_mb']:.0f} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()

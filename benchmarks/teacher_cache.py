"""Offline teacher cache on the embedded SmolLM2-135M: cache bytes per token and build time for
k = 8, 32, 128, and distillation step time and peak memory with the cache vs the live teacher.

    python benchmarks/teacher_cache.py [--steps 4] [--gbs 4] [--mbs 2] [--seq 256] [--dtype fp32]
                                       [--ks 8,32,128] [--student PATH]

Every configuration runs in its own process (peak RSS is per process), through the stages' own
entry points (`teacher_cache` build, `distill` run) on the embedded corpus. Default student: a
copy of the teacher (same size, so the teacher forward is the smallest share it can be: 2N of
8N FLOPs per token); a pruned student gains more. Step time: median of the per-step times the
training loop logs, first step left out (warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cache_bench import smol_jobs


def jobs(args, work: Path):
    from nemo_minitron.config.schema import TrainConfig

    train = TrainConfig(steps=args.steps, global_batch_size=args.gbs, micro_batch_size=args.mbs,
                        warmup_steps=1, log_interval=1, eval_interval=0, eval_batches=1,
                        save_interval=0, tensorboard=False)
    return smol_jobs(work, args.student or str(work / "student"), train, args.seq, args.dtype)


def one(args, what: str, work: Path) -> dict:
    """One configuration in this process: 'cache<k>', 'live<k>' or 'cached<k>'."""
    from nemo_minitron import preflight
    from nemo_minitron.distill import teacher_cache
    from nemo_minitron.distill.trainer import run_distill

    _, cache_job, distill_job = jobs(args, work)
    k = int(what.lstrip("acdehilv"))
    t = time.perf_counter()
    if what.startswith("cache") and not what.startswith("cached"):
        res = teacher_cache.build(cache_job(k, f"cache{k}"))
        out = {"bytes_per_token": res["bytes_per_token"], "build_s": time.perf_counter() - t,
               "tokens": res["tokens"]}
    else:
        kd = dict(top_k=k) if what.startswith("live") else dict(teacher_cache=str(work / f"cache{k}"))
        j = distill_job(what, **kd)
        preflight.check("distill", j)
        run_distill(j)
        rows = [json.loads(x) for x in (Path(j.output) / "metrics.jsonl").read_text().splitlines()]
        tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
        out = {"step_s": statistics.median(args.gbs * args.seq / x for x in tps),
               "kd": [r["kd"] for r in rows if "kd" in r]}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--gbs", type=int, default=4)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--ks", default="8,32,128")
    p.add_argument("--student", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args, args.one, Path(args.work))), flush=True)
        return
    ks = [int(x) for x in args.ks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher, _, _ = jobs(args, work)
        if not args.student:
            shutil.copytree(teacher, work / "student")
        res = {}
        mid = ks[len(ks) // 2]
        for what in [f"cache{k}" for k in ks] + [f"live{mid}", f"cached{mid}"]:
            cmd = [sys.executable, __file__, "--one", what, "--work", tmp] + sys.argv[1:]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env=dict(os.environ, PYTHONWARNINGS="ignore"))
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{what} failed:\n{proc.stderr[-3000:]}")
            res[what] = json.loads(line[0][7:])
            print(what, res[what], flush=True)
    print(f"\nSmolLM2-135M teacher, student {'copy of teacher' if not args.student else args.student}, "
          f"{args.dtype}, {args.steps} steps x {args.gbs} x {args.seq} tokens, "
          f"{os.cpu_count()} cores, torch threads default")
    print("| k | bytes/token (fp16 logp + manifest ids_dtype ids) | cache build s | build peak RSS MB |")
    print("|---|---|---|---|")
    for k in ks:
        r = res[f"cache{k}"]
        print(f"| {k} | {r['bytes_per_token']:.1f} | {r['build_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    print(f"\n| distill (k={mid}) | step s | peak RSS MB |\n|---|---|---|")
    for what in (f"live{mid}", f"cached{mid}"):
        r = res[what]
        print(f"| {'live teacher, top-k' if what.startswith('live') else 'teacher cache'} | "
              f"{r['step_s']:.2f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()

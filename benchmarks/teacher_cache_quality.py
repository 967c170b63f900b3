"""What the offline teacher cache costs in quality and saves in compute, on a pruned SmolLM2.

    python benchmarks/teacher_cache_quality.py --student runs/half [--steps 30] [--gbs 4]
        [--mbs 2] [--seq 256] [--lr 1e-3] [--dtype fp32] [--ks 8,32,128] [--distill-ks 32,128]
        [--eval-batches 8] [--jobs 4] [--out DIR]

The student is a `minitron prune` output of the embedded SmolLM2-135M teacher (e.g.
`minitron prune prune=half_width output=runs/half`). Rows, every training row on the same
batches (steps x gbs x seq tokens, same lr schedule and seed):

  online   the live teacher, full-vocabulary forward KL (kd.top_k unset)
  cache k  the teacher cache of k ids per token with the residual bucket (kd.teacher_cache)

Printed: the caches' bytes per token (fp16 log-probabilities, ids in the manifest's id type),
held-out loss of teacher / pruned student / each trained row (`minitron evaluate`, the same
validation batches), and per distillation the median process CPU seconds per step (steps 2..N:
CPU time of the process between consecutive metric writes, all its threads), the whole process's
CPU seconds and its peak RSS. CPU seconds, unlike wall time, hardly move with other load on the
machine; every child runs one torch thread (OMP_NUM_THREADS=1) so that no thread spins waiting
for a descheduled sibling. Each configuration runs in its own process, `--jobs` at a time;
results are kept as JSON under --out so a rerun continues where one stopped.
The online row and each cache's build-then-distillation run side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cache_bench import cpu_seconds, peak_rss_mb, run_child, smol_jobs


def jobs(args):
    from nemo_minitron.config.schema import TrainConfig

    train = TrainConfig(steps=args.steps, global_batch_size=args.gbs, micro_batch_size=args.mbs,
                        lr=args.lr, min_lr=args.lr / 10, warmup_steps=min(4, args.steps // 5),
                        log_interval=1, eval_interval=0, eval_batches=1, save_interval=0,
                        tensorboard=False)
    return smol_jobs(Path(args.out), str(Path(args.student).resolve()), train, args.seq,
                     args.dtype)


def step_cpu_marks():
    """Record the process CPU time at every metrics write of the training loop (log_interval=1:
    once per step)."""
    from nemo_minitron.distill import logger

    marks, write = [], logger.Logger.write

    def counted(self, step, metrics, *a, **kw):
        if "loss" in metrics:
            marks.append(cpu_seconds())
        return write(self, step, metrics, *a, **kw)

    logger.Logger.write = counted
    return marks


def one(args, what: str) -> dict:
    """One configuration in this process: 'build<k>', 'online' or 'cache<k>'."""
    from nemo_minitron import preflight
    from nemo_minitron.distill import teacher_cache
    from nemo_minitron.distill.trainer import run_distill

    _, cache_job, distill_job = jobs(args)
    t0 = cpu_seconds()
    if what.startswith("build"):
        res = teacher_cache.build(cache_job(int(what[5:]), f"tc{what[5:]}"))
        out = {"bytes_per_token": res["bytes_per_token"], "tokens": res["tokens"],
               "ids_dtype": teacher_cache.read_manifest(res["output"])["ids_dtype"]}
    else:
        kd = {} if what == "online" else {"teacher_cache": str(Path(args.out) / f"tc{what[5:]}")}
        j = distill_job(what, **kd)
        preflight.check("distill", j)
        marks = step_cpu_marks()
        run_distill(j)
        per_step = [b - a for a, b in zip(marks, marks[1:])]
        rows = [json.loads(x) for x in (Path(j.output) / "metrics.jsonl").read_text().splitlines()]
        out = {"step_cpu_s": statistics.median(per_step), "steps_timed": len(per_step),
               "kd": [r["kd"] for r in rows if "kd" in r]}
    out.update(process_cpu_s=cpu_seconds() - t0, peak_rss_mb=peak_rss_mb())
    return out


def evaluate(args, name: str, checkpoint) -> float:
    res = Path(args.out) / f"eval_{name}.json"
    if not res.is_file():
        proc = subprocess.run([sys.executable, "-m", "nemo_minitron", "evaluate",
                               f"model.checkpoint={checkpoint}", f"data.seq_length={args.seq}",
                               "eval.micro_batch_size=4", f"eval.num_batches={args.eval_batches}",
                               f"output={res}"], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
        if proc.returncode:
            raise RuntimeError(f"evaluate {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(res.read_text())["loss"]


def run_all(args) -> tuple[dict, dict]:
    ks = [int(x) for x in args.ks.split(",")]
    dks = [int(x) for x in args.distill_ks.split(",")]
    # chains run side by side: the online row, and each cache's build then its distillation
    chains = [["online"]] + [[f"build{k}"] + ([f"cache{k}"] if k in dks else []) for k in ks]
    pool = ThreadPoolExecutor(args.jobs)
    run = lambda w: run_child(__file__, w, Path(args.out) / f"{w}.json")  # noqa: E731
    res = {w: r for done in pool.map(lambda c: [(w, run(w)) for w in c], chains) for w, r in done}
    teacher, _, _ = jobs(args)
    rows = {"teacher": teacher, "pruned student": args.student,
            "online full-vocabulary KL": Path(args.out) / "online" / "final",
            **{f"cache k={k} + rest bucket": Path(args.out) / f"cache{k}" / "final" for k in dks}}
    names = list(rows)
    tag = lambda n: n.split()[0] + (n.split()[1][2:] if n.startswith("cache") else "")  # noqa: E731
    losses = dict(zip(names, pool.map(lambda n: evaluate(args, tag(n), rows[n]), names)))
    return res, losses


def report(args, res: dict, losses: dict) -> str:
    ks = [int(x) for x in args.ks.split(",")]
    dks = [int(x) for x in args.distill_ks.split(",")]
    tokens = args.steps * args.gbs * args.seq
    lines = [f"SmolLM2-135M teacher -> {Path(args.student).name} student, {args.dtype}, "
             f"{args.steps} steps x {args.gbs} x {args.seq} tokens ({tokens}), lr {args.lr}, "
             f"held-out loss over {args.eval_batches} x 4 x {args.seq} validation tokens", "",
             "| k | bytes/token | ids |", "|---|---|---|"]
    lines += [f"| {k} | {res[f'build{k}']['bytes_per_token']:.1f} | "
              f"{res[f'build{k}']['ids_dtype']} |" for k in ks]
    lines += ["", "| row | held-out loss |", "|---|---|"]
    lines += [f"| {n} | {v:.4f} |" for n, v in losses.items()]
    lines += ["", "| distillation | CPU s/step (median) | process CPU s | peak RSS MB |",
              "|---|---|---|---|"]
    for name in ["online"] + [f"cache{k}" for k in dks]:
        r = res[name]
        lines.append(f"| {name} | {r['step_cpu_s']:.1f} | {r['process_cpu_s']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    for k in ks:
        r = res[f"build{k}"]
        lines.append(f"| build cache k={k} ({args.steps} steps) | | {r['process_cpu_s']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--student", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--gbs", type=int, default=4)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--ks", default="8,32,128")
    p.add_argument("--distill-ks", default="32,128")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--out", default="runs/teacher_cache_quality")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out = str(Path(args.out).resolve())
    if args.one:
        print("RESULT " + json.dumps(one(args, args.one)), flush=True)
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    text = report(args, *run_all(args))
    (Path(args.out) / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

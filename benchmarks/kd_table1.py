"""Minitron's Table 1, small: what retraining a pruned SmolLM2-135M student should use.

    python benchmarks/kd_table1.py --out runs/table1 [--steps 40] [--seq 128]

Rows (held-out Wikipedia loss, same batches for every row):
  (a) the teacher; (b) the width-pruned student (~half the non-embedding parameters) before
  retraining; (c) (b) distilled from the teacher (logit KL); (d) (b) retrained with LM loss only;
  (e) a randomly initialised student of (b)'s architecture distilled the same way; (f) a
  depth-pruned student of similar size distilled the same way. Every training row sees the same
  tokens (steps x global batch x seq). Each stage runs through the `minitron` CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def minitron(*args: str) -> None:
    t = time.time()
    subprocess.run([sys.executable, "-m", "nemo_minitron", *args], check=True,
                   stdout=subprocess.DEVNULL)
    print(f"  minitron {args[0]} ... {time.time() - t:.0f} s", flush=True)


def random_init_like(src: Path, out: Path) -> None:
    """A checkpoint with ``src``'s architecture and tokenizer but freshly initialised weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from nemo_minitron.convert import checkpoint as ckpt
    from nemo_minitron.convert.hf_config import hf_config_from_arch

    c = ckpt.Checkpoint(src)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config_from_arch(c.arch))
    ckpt.save(out, c.arch, model.state_dict(), tokenizer=c.tokenizer(),
              provenance={"stage": "random_init", "like": str(src)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/table1")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--gbs", type=int, default=4)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--calib", type=int, default=256, help="calibration samples for pruning")
    args = ap.parse_args()
    from nemo_minitron import demo

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    teacher = str(demo.checkpoint_dir())
    seq = [f"data.seq_length={args.seq}"]
    train = seq + [f"train.steps={args.steps}", f"train.global_batch_size={args.gbs}",
                   "train.micro_batch_size=2", "train.lr=3e-4", "train.min_lr=3e-5",
                   "train.warmup_steps=4", "train.eval_interval=0", "train.save_interval=0",
                   "train.log_interval=10"]
    h = lambda name: f"hydra.run.dir={out}/hydra/{name}"  # noqa: E731
    t0 = time.time()
    if not (out / "width").exists():
        minitron("prune", "prune=half_width", f"prune.calib_samples={args.calib}", *seq,
                 f"output={out}/width", h("width"))
    if not (out / "depth").exists():  # similar size by layers: ~14 of 30 keep ~half non-embedding
        minitron("prune", "prune=none", "prune.target.num_layers=14", "prune.calib_samples=64",
                 *seq, f"output={out}/depth", h("depth"))
    if not (out / "random").exists():
        random_init_like(out / "width", out / "random")
    runs = {"c_kd": ("distill", out / "width"), "d_lm": ("finetune", out / "width"),
            "e_random_kd": ("distill", out / "random"), "f_depth_kd": ("distill", out / "depth")}
    for name, (stage, student) in runs.items():
        if not (out / name / "final").exists():
            minitron(stage, f"model.checkpoint={student}", *train, f"output={out}/{name}", h(name))
    rows = {"a_teacher": teacher, "b_pruned": out / "width", **{k: out / k / "final" for k in runs}}
    results = {}
    for name, ck in rows.items():
        res = out / f"eval_{name}.json"
        if not res.exists():
            minitron("evaluate", f"model.checkpoint={ck}", *seq, "eval.micro_batch_size=4",
                     f"eval.num_batches={args.eval_batches}", f"output={res}", h(f"eval_{name}"))
        results[name] = json.loads(res.read_text())
    params = {n: json.loads((Path(ck) / "minitron.json").read_text()).get("num_params")
              for n, ck in rows.items()}
    tokens = args.steps * args.gbs * args.seq
    lines = [f"held-out loss, {results['a_teacher']['tokens']} tokens of Wikipedia; "
             f"retraining budget {tokens} tokens ({args.steps} steps x {args.gbs} x {args.seq})",
             "", "| row | params | val loss |", "|---|---|---|"]
    for n, r in results.items():
        lines.append(f"| {n} | {params[n] / 1e6:.1f}M | {r['loss']:.3f} |")
    lines.append(f"\ntotal wall time {time.time() - t0:.0f} s, {os.cpu_count()} cpus")
    text = "\n".join(lines)
    (out / "table1.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

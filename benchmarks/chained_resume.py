"""Two chained compression rounds on SmolLM2-135M, killed (SIGKILL) between stages and resumed.

Round 1 prunes the teacher to ~75% of its parameters, round 2 prunes round 1's distilled student
further; each round distils from its own teacher. The pipeline is killed as soon as a chosen
stage's output is complete, relaunched, and the script reports which stages each launch ran or
skipped, the wall time of each launch, and the final summary (loss per round).

    python benchmarks/chained_resume.py --out runs/chained --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = ("[{target:{hidden_size:448,ffn_hidden_size:1152}},"
          "{target:{hidden_size:384,ffn_hidden_size:1024,num_attention_heads:6}}]")


def launch(args, kill_when: Path | None):
    cmd = [sys.executable, "-m", "nemo_minitron", "pipeline", f"output={args.out}",
           f"pipeline.rounds={ROUNDS}", f"train.steps={args.steps}", "train.save_interval=5",
           f"prune.calib_samples={args.calib}", "eval.tasks=[]", "eval.num_batches=4"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.time()
    log_path = Path(args.out).with_suffix(f".launch{len(list(Path(args.out).parent.glob(Path(args.out).name + '.launch*')))}.log")
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        killed = False
        while proc.poll() is None:
            if kill_when is not None and kill_when.exists():
                os.killpg(proc.pid, signal.SIGKILL)  # no clean-up: as if the node died
                killed = True
                break
            time.sleep(0.5)
        proc.wait()
    log = log_path.read_text()
    ran = re.findall(r"- \[(.+?)\] running", log)
    skipped = re.findall(r"- \[(.+?)\] complete, skipped", log)
    return {"seconds": round(time.time() - t0, 1), "killed": killed, "rc": proc.returncode,
            "ran": ran, "skipped": skipped, "log_tail": log[-1500:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/chained")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--calib", type=int, default=32)
    args = ap.parse_args()
    out = Path(args.out)
    kills = [out / "round1" / "pruned" / "minitron.json",  # between prune and distill
             out / "round1" / "distill" / "checkpoints" / "step_0000005" / "minitron.json",  # mid-distill
             out / "round2" / "pruned" / "minitron.json",  # between rounds' stages
             None]
    runs = []
    for k in kills:
        r = launch(args, k)
        runs.append(r)
        print(f"launch {len(runs)}: {r['seconds']:.0f} s, killed={r['killed']}, rc={r['rc']}\n"
              f"  ran: {r['ran']}\n  skipped: {r['skipped']}", flush=True)
        if not r["killed"] and r["rc"] != 0:
            print(r["log_tail"])
            sys.exit(1)
    summary = json.loads((out / "summary.json").read_text())
    for rd in summary["rounds"]:
        print(f"{rd['name']}: {rd['params']['teacher'] / 1e6:.1f}M -> {rd['params']['student'] / 1e6:.1f}M, "
              f"val loss teacher {rd['val_loss']['teacher']:.3f} | pruned {rd['val_loss']['pruned']:.3f}"
              f" | distilled {rd['val_loss']['distilled']:.3f}")
    assert summary["rounds"][1]["teacher"] == summary["rounds"][0]["student"]
    (out / "resume_log.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()

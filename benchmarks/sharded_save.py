"""Save and load time, peak memory and bytes read per rank: gather-to-one-rank saves vs sharded
saves (``train.sharded_save``, :mod:`nemo_minitron.convert.sharded`), at TP=2 and at DP=2.

    python benchmarks/sharded_save.py [--checkpoint DIR] [--work DIR]

Default model: the embedded SmolLM2-135M teacher (fp32). Its 9 heads in 3 query groups do not
split over 2 TP ranks, so it is first pruned (random importance, real weights) to 2 query groups
of 3 heads, 6 heads in all; every other size is SmolLM2-135M's. Each (layout, mode) runs in its
own torchrun launch (2 ranks, gloo, one thread each), so peak figures do not carry over. Per rank:
the model is loaded (not measured), saved (wall time of the collective save, peak resident set
over it minus the resident set before it), and the saved checkpoint loaded into a fresh model at
the same layout (time, peak, tensor bytes read: ``Checkpoint.bytes_read``). Peaks are Linux
``VmHWM`` after resetting it with ``/proc/self/clear_refs``; they include the pages of the
memory-mapped files a load touches. At DP=2 (TP=1) both modes write the canonical layout: nothing
is gathered at TP=1, so the sharded switch does not apply there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sliced_load import ROOT, _status_kb  # noqa: E402

LAYOUTS = {"tp2": 2, "dp2": 1}  # name -> TP size over 2 ranks


def _measured(fn):
    """(seconds, peak MiB over the resident set before) of ``fn()``, after a barrier."""
    from nemo_minitron.runtime import dist

    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, (_status_kb("VmHWM") - before) / 1024


def worker(checkpoint: str, work: str, layout: str, mode: str) -> None:
    import torch

    from nemo_minitron.convert import checkpoint as ckpt
    from nemo_minitron.runtime import dist
    from nemo_minitron.runtime.shard import build_shard, load_checkpoint, load_state, save_checkpoint

    dist.init(LAYOUTS[layout], 1)
    shard, _ = load_checkpoint(checkpoint)
    out = Path(work) / f"{layout}_{mode}"
    save_s, save_peak = _measured(lambda: save_checkpoint(
        shard, out, provenance={"stage": "benchmark"}, overwrite=True, sharded=mode == "sharded"))
    del shard
    c = ckpt.Checkpoint(out)
    fresh = build_shard(c.arch, init_weights=False)
    load_s, load_peak = _measured(lambda: load_state(fresh, c.get, c.get_part))
    print("ROW " + json.dumps({"layout": layout, "mode": mode, "rank": torch.distributed.get_rank(),
                               "save_s": save_s, "save_peak": save_peak, "load_s": load_s,
                               "load_peak": load_peak, "bytes_read": c.bytes_read,
                               "files": {f: (out / f).stat().st_size for f in c.files()}}),
          flush=True)
    dist.shutdown()


def launch(checkpoint: str, work: str, layout: str, mode: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               NEMO_MINITRON_DEVICE="cpu", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                        __file__, "--worker", layout, mode, "--checkpoint", checkpoint,
                        "--work", work], capture_output=True, text=True, env=env)
    if p.returncode:
        sys.exit(f"{layout} {mode} run failed:\n{p.stderr[-3000:]}")
    return sorted((json.loads(line[4:]) for line in p.stdout.splitlines()
                   if line.startswith("ROW ")), key=lambda r: r["rank"])


def two_group_student(source: str, out: Path) -> str:
    """``source`` pruned to 2 query groups (of 3 heads each), so that it splits over TP=2."""
    from nemo_minitron.convert import checkpoint as ckpt
    from nemo_minitron.pruning.apply import apply_plan
    from nemo_minitron.pruning.select import Targets, make_plan, random_importance

    if not (out / ckpt.ARCH).is_file():
        src = ckpt.Checkpoint(source)
        heads = src.arch.heads_per_group * 2
        plan = make_plan(src.arch, random_importance(src.arch, 0),
                         Targets(num_attention_heads=heads, num_query_groups=2))
        ckpt.save(out, plan.target, apply_plan(plan, src.tensors()), tokenizer=src.tokenizer(),
                  provenance={"stage": "benchmark"}, overwrite=True)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="a TP=2-splittable checkpoint (default: "
                    "SmolLM2-135M pruned to 2 query groups)")
    ap.add_argument("--work", default=None, help="where checkpoints are written (default: a "
                    "temporary directory)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.checkpoint, a.work, *a.worker)
    work = a.work or tempfile.mkdtemp(prefix="sharded_save-")
    try:
        run(a, work)
    finally:
        if a.work is None:  # our own temporary directory: a model and its checkpoints, GBs
            shutil.rmtree(work, ignore_errors=True)


def run(a, work: str) -> None:
    if a.checkpoint is None:
        from nemo_minitron import demo

        a.checkpoint = two_group_student(str(demo.checkpoint_dir()), Path(work) / "model")
    size = sum(f.stat().st_size for f in Path(a.checkpoint).glob("*.safetensors"))
    print(f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"{a.checkpoint}: {size / 2**20:.0f} MiB of safetensors; 2 ranks")
    print(f"{'layout':<6} {'mode':<8} {'rank':>4} {'save s':>7} {'save peak MiB':>13} "
          f"{'load s':>7} {'load peak MiB':>13} {'read MiB':>9} {'of model':>8}")
    for layout in LAYOUTS:
        for mode in ("gather", "sharded"):
            rows = launch(a.checkpoint, work, layout, mode)
            for r in rows:
                print(f"{layout:<6} {mode:<8} {r['rank']:>4} {r['save_s']:>7.2f} "
                      f"{r['save_peak']:>13.1f} {r['load_s']:>7.2f} {r['load_peak']:>13.1f} "
                      f"{r['bytes_read'] / 2**20:>9.1f} {r['bytes_read'] / size:>8.2f}")
            print(f"{'':<6} files: " + ", ".join(f"{f} {n / 2**20:.0f} MiB"
                                                 for f, n in rows[0]["files"].items()))


if __name__ == "__main__":
    main()

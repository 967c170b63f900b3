"""Bytes read, time and peak memory per rank when loading a checkpoint at TP=k: whole tensors
(fetch, then chunk: the loader before issue 20) vs safetensors slices (each rank reads its shard).

    python benchmarks/sliced_load.py [--checkpoint DIR] [--tp 3]

Default checkpoint: the embedded SmolLM2-135M teacher (fp32, 538 MB, one safetensors file), at
TP=3 (its 9 heads and 3 query groups do not split over 2 ranks). Each
mode runs in its own torchrun launch (``--tp`` ranks, gloo, one thread each), so peak figures do
not carry over. Per rank: the model shard is built first (its parameters are not counted), then
the load is measured: tensor bytes fetched from the file (``Checkpoint.bytes_read``), wall time,
and the peak resident set over the load (Linux ``VmHWM`` after resetting it with
``/proc/self/clear_refs``) minus the resident set before it. The resident set counts the pages of
the memory-mapped safetensors file that the reads touched as well as the copies made.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def worker(checkpoint: str, mode: str) -> None:
    import torch

    from nemo_minitron.convert import checkpoint as ckpt
    from nemo_minitron.runtime import dist
    from nemo_minitron.runtime.shard import build_shard, load_state

    dist.init(int(os.environ["WORLD_SIZE"]), 1)
    c = ckpt.Checkpoint(checkpoint)
    shard = build_shard(c.arch, init_weights=False)
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before, file_before = _status_kb("VmRSS"), _status_kb("RssFile")
    t0 = time.perf_counter()
    load_state(shard, c.get, c.get_part if mode == "sliced" else None)
    seconds = time.perf_counter() - t0
    peak, file_pages = _status_kb("VmHWM"), _status_kb("RssFile") - file_before
    print("ROW " + json.dumps({"mode": mode, "rank": torch.distributed.get_rank(),
                               "bytes_read": c.bytes_read, "seconds": seconds,
                               "peak_mib": (peak - before) / 1024,
                               "file_mib": file_pages / 1024}), flush=True)
    dist.shutdown()


def launch(checkpoint: str, mode: str, tp: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               NEMO_MINITRON_DEVICE="cpu", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp}",
                        __file__, "--worker", mode, "--checkpoint", checkpoint],
                       capture_output=True, text=True, env=env)
    if p.returncode:
        sys.exit(f"{mode} run failed:\n{p.stderr[-3000:]}")
    return sorted((json.loads(line[4:]) for line in p.stdout.splitlines()
                   if line.startswith("ROW ")), key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--worker", choices=["full", "sliced"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.checkpoint is None:
        from nemo_minitron import demo

        a.checkpoint = str(demo.checkpoint_dir())
    if a.worker:
        return worker(a.checkpoint, a.worker)
    size = sum(f.stat().st_size for f in Path(a.checkpoint).glob("*.safetensors"))
    print(f"{platform.machine()}, {os.cpu_count()} cores; {a.checkpoint}: "
          f"{size / 2**20:.0f} MiB of safetensors; TP={a.tp}")
    print(f"{'mode':<7} {'rank':>4} {'read MiB':>9} {'of file':>8} {'mapped MiB':>10} "
          f"{'time s':>7} {'peak MiB':>9}")
    for mode in ("full", "sliced"):
        for r in launch(a.checkpoint, mode, a.tp):
            print(f"{mode:<7} {r['rank']:>4} {r['bytes_read'] / 2**20:>9.1f} "
                  f"{r['bytes_read'] / size:>8.2f} {r['file_mib']:>10.1f} {r['seconds']:>7.2f} "
                  f"{r['peak_mib']:>9.1f}")


if __name__ == "__main__":
    main()

"""Host memory settings side by side: the distillation step under each, in its own process.

    python benchmarks/host_memory.py [--compare malloc|thp] [--repeats 2]
                                     [-- distill_step.py arguments]

Runs ``benchmarks/distill_step.py --no-hf`` (ours only; default ``--dtypes bf16 --steps 3``) in
a child process per setting, the settings alternating ``--repeats`` times, and prints each
child's best KD step, its minor page faults and system CPU seconds (the whole child: model
building included).

- ``--compare malloc`` (default): glibc's default (``NEMO_MINITRON_MALLOC=default``) against
  freed memory kept for reuse, what ``minitron`` sets (``nemo_minitron/runtime/host_alloc.py``).
- ``--compare thp``: ``THP_MEM_ALLOC_ENABLE=0`` and ``=1``, which makes PyTorch's CPU allocator
  ask for 2 MB transparent huge pages for blocks of 2 MB and more (with glibc's default malloc);
  the kernel's mode is printed, since the hint does nothing where it is ``never``.

Results and decisions: docs/benchmarks.md, "Huge pages" and "Freed host memory".
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


SETTINGS = {
    "malloc": {"glibc default": {"NEMO_MINITRON_MALLOC": "default"},
               "kept for reuse": {"NEMO_MINITRON_MALLOC": "keep"}},
    "thp": {"THP_MEM_ALLOC_ENABLE=0": {"THP_MEM_ALLOC_ENABLE": "0",
                                       "NEMO_MINITRON_MALLOC": "default"},
            "THP_MEM_ALLOC_ENABLE=1": {"THP_MEM_ALLOC_ENABLE": "1",
                                       "NEMO_MINITRON_MALLOC": "default"}},
}


def child(setting: dict, extra: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(setting)
    malloc = ["--malloc", "default"] if setting.get("NEMO_MINITRON_MALLOC") == "default" else []
    out = subprocess.run([sys.executable, str(HERE / "distill_step.py"), "--no-hf", *malloc,
                          *extra],
                         env=env, capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    steps = {m.group(1): float(m.group(2))
             for m in re.finditer(r"^ours\s+(\w+)\s+\S+s\s+\S+s\s+([\d.]+)s", out, re.M)}
    return {"kd": steps, "minflt": after.ru_minflt - before.ru_minflt,
            "sys": after.ru_stime - before.ru_stime, "user": after.ru_utime - before.ru_utime}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", choices=tuple(SETTINGS), default="malloc")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for distill_step.py")
    args = ap.parse_args()
    extra = [a for a in args.rest if a != "--"] or ["--dtypes", "bf16", "--steps", "3"]
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    print(f"transparent_hugepage: {mode.read_text().strip() if mode.exists() else 'unknown'}; "
          f"distill_step.py {' '.join(extra)}; load {os.getloadavg()[0]:.2f}")
    rows = []
    for r in range(args.repeats):
        for setting, env in SETTINGS[args.compare].items():
            res = child(env, extra)
            rows.append((setting, res))
            kd = ", ".join(f"{dt} {t:.2f} s" for dt, t in res["kd"].items())
            print(f"repeat {r + 1} {setting}: KD step {kd}; "
                  f"{res['minflt'] / 1e6:.2f}M minor faults, sys {res['sys']:.1f} s, "
                  f"user {res['user']:.1f} s (load {os.getloadavg()[0]:.2f})", flush=True)
    for setting in SETTINGS[args.compare]:
        mine = [res for s, res in rows if s == setting]
        best = {dt: min(r["kd"][dt] for r in mine) for dt in mine[0]["kd"]}
        print(f"{setting}: best KD step "
              + ", ".join(f"{dt} {t:.2f} s" for dt, t in best.items())
              + f"; minor faults {min(r['minflt'] for r in mine) / 1e6:.2f}M, "
              f"sys {min(r['sys'] for r in mine):.1f} s per run")


if __name__ == "__main__":
    main()

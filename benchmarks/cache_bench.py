"""What the teacher-cache benchmarks share: the embedded SmolLM2 jobs, CPU and memory readings,
and running one configuration in a fresh process (its own peak RSS) with a kept result.

Imported by benchmarks/teacher_cache*.py as a sibling module (the script's folder is on the path).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def cpu_seconds(children: bool = False) -> float:
    """User + system CPU seconds of this process (all threads), and of its waited-for children."""
    t = os.times()
    return t.user + t.system + ((t.children_user + t.children_system) if children else 0.0)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def smol_jobs(out: Path, student: str, train, seq: int, dtype: str):
    """``(teacher, cache_job(k, name), distill_job(name, **kd))`` on the embedded SmolLM2-135M
    teacher and corpus, writing under ``out``."""
    from nemo_minitron.assets import cache_dir
    from nemo_minitron.config.schema import (CacheConfig, DataConfig, DistillJob, KDConfig,
                                             ModelConfig, TeacherCacheJob)

    teacher = str(cache_dir() / "checkpoints" / "smollm2-135m-instruct")
    data = DataConfig(prefix=str(cache_dir() / "data" / "wiki_smollm2"), seq_length=seq)
    model = ModelConfig(name="smollm2", checkpoint=student, dtype=dtype)

    def cache_job(k, name):
        return TeacherCacheJob(model=model, data=data, train=train, kd=KDConfig(teacher=teacher),
                               cache=CacheConfig(k=k, dtype="fp16"), output=str(out / name))

    def distill_job(name, **kd):
        return DistillJob(model=model, data=data, train=train, output=str(out / name),
                          kd=KDConfig(teacher=teacher, **kd))

    return teacher, cache_job, distill_job


def run_child(script: str, what: str, keep: Path | None = None, threads: str | None = "1") -> dict:
    """``script --one what <this process's arguments>`` in a fresh process; its ``RESULT {json}``
    line plus ``wall_s``. With ``keep``: the result is stored there and read back on a rerun.
    ``threads``: OMP_NUM_THREADS of the child (one thread: none spins on a descheduled sibling,
    so CPU seconds stay comparable under load); None keeps torch's default."""
    if keep is not None and keep.is_file():
        return json.loads(keep.read_text())
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if threads:
        env["OMP_NUM_THREADS"] = threads
    t = time.time()
    proc = subprocess.run([sys.executable, script, "--one", what] + sys.argv[1:],
                          capture_output=True, text=True, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    out = dict(json.loads(line[0][7:]), wall_s=time.time() - t)
    if keep is not None:
        keep.write_text(json.dumps(out))
    print(what, json.dumps(out), flush=True)
    return out

"""Child processes of the tests: the CLI (``python -m nemo_minitron``), other Python entry points,
and multi-rank workers under torchrun. Every child imports this checkout (the package and the
``tests`` package) through PYTHONPATH, whatever the directory it runs in."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKERS = ROOT / "tests" / "workers"
TAIL = 6000  # characters of each stream a failure message keeps
CLI_ENV = {"OMP_NUM_THREADS": "2", "MPLBACKEND": "Agg"}  # what a CLI child adds to child_env


def child_env(**extra: str) -> dict:
    """This process's environment with this checkout first on PYTHONPATH, plus ``extra``."""
    return dict(os.environ, PYTHONPATH=str(ROOT), **extra)


def failure(cmd, rc: int, stdout: str | None, stderr: str | None) -> str:
    return (f"{' '.join(map(str, cmd))} failed ({rc}):\n{(stdout or '')[-TAIL:]}\n"
            f"{(stderr or '')[-TAIL:]}")


def run(cmd, *, env: dict | None = None, timeout: float = 600, check: bool = True,
        cwd=None) -> subprocess.CompletedProcess:
    """Runs ``cmd`` to completion with its output captured as text; with ``check``, a non-zero
    exit fails the test with the command and the tails of both streams."""
    p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(failure(cmd, p.returncode, p.stdout, p.stderr))
    return p


def python(*args, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """``python ARGS`` with this interpreter; ``env`` adds to :func:`child_env`."""
    return run([sys.executable, *args], env=child_env(**(env or {})), **kw)


def minitron(*args, env: dict | None = None, timeout: float = 300,
             **kw) -> subprocess.CompletedProcess:
    """``python -m nemo_minitron ARGS`` on two threads, plotting headless (``env`` adds to
    it). Unchecked by default: many callers assert on a failing exit; pass ``check=True`` to
    require success."""
    kw.setdefault("check", False)
    return python("-m", "nemo_minitron", *args, env={**CLI_ENV, **(env or {})}, timeout=timeout,
                  **kw)


def minitron_popen(*args, env: dict | None = None, module: str = "nemo_minitron",
                   **kw) -> subprocess.Popen:
    """``python -m MODULE ARGS`` started in the background (text pipes for both streams unless
    ``kw`` says otherwise), for tests that interrupt or kill the run."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], text=True,
                            env=child_env(**{**CLI_ENV, **(env or {})}), **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(module: str, nproc: int, *args) -> list[str]:
    """The command line that starts ``nproc`` ranks of ``python -m MODULE ARGS`` on this host."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", "-m", module, *map(str, args)]


def torchrun(worker: str, nproc: int, *args, timeout: float = 600,
             check: bool = True) -> list[dict]:
    """Runs ``tests.workers.<worker>`` on ``nproc`` ranks (one thread each); returns the JSON
    rows every rank emitted (``tests.workers._emit``), rank by rank; ``check=False`` for a launch
    that is meant to die (rows emitted before are still returned)."""
    rdir = tempfile.mkdtemp(prefix="results-")
    env = child_env(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", RESULT_DIR=rdir)
    run(torchrun_cmd(f"tests.workers.{worker}", nproc, *args), env=env, timeout=timeout,
        check=check)
    rows = []
    for f in sorted(Path(rdir).glob("rank*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines()]
    return rows

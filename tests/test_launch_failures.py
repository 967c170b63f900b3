"""Failures of a job launched with torchrun: a refused request is said once (not once per rank,
not two ranks' lines run together), and ranks whose launcher was killed end instead of training
on as orphans."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.proc import child_env, torchrun_cmd
from tests.test_distill_run import distill_args, models  # noqa: F401 (fixture)

pytestmark = pytest.mark.multirank


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_refusal_is_said_once(models, tmp_path):  # noqa: F811
    """A target that tp=2 cannot split was said once per rank (and the lines could run
    together: torchrun's ``python -u`` writes print's text and newline apart)."""
    t = models
    out = tmp_path / "p"
    cmd = torchrun_cmd("nemo_minitron", 2, "prune", f"model.checkpoint={t / 'teacher'}",
                       f"data.prefix={t / 'corpus'}", "data.seq_length=32", "parallel.tp=2",
                       "prune=none", "prune.target.ffn_hidden_size=127", f"output={out}")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=child_env(OMP_NUM_THREADS="1"))
    said = [x for x in p.stderr.splitlines() if "minitron prune: error" in x]
    assert p.returncode != 0 and len(said) == 1, p.stderr[-3000:]
    assert said[0].startswith("minitron prune: error: prune.target: the pruned model's "
                              "ffn_hidden_size=127 is not divisible by parallel.tp=2"), said
    assert not out.exists()


def test_ranks_end_with_a_killed_launcher(models, tmp_path):  # noqa: F811
    """torchrun killed with SIGKILL left both ranks training, and a relaunch on the same output
    ran beside them."""
    t = models
    out = tmp_path / "run"
    args = [a for a in distill_args(t, out) if not a.startswith("train.steps=")]
    p = subprocess.Popen(torchrun_cmd("nemo_minitron", 2, *args, "train.steps=100000"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=child_env(OMP_NUM_THREADS="1"), start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list(out.glob("checkpoints/step_*")):
            assert p.poll() is None and time.time() < deadline, "the run ended before training"
            time.sleep(0.1)
        ranks = _children(p.pid)
        assert len(ranks) == 2, ranks
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        deadline = time.time() + 30
        while any(_alive(r) for r in ranks) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(r) for r in ranks), "ranks outlived their launcher"
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

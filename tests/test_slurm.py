"""The Slurm launchers on a real single-node Slurm cluster started on localhost, plus the failure
path of a multi-rank job under torchrun.

The ``slurm`` fixture installs Slurm and munge with apt when ``slurmctld`` is missing (Debian
``slurmctld slurmd slurm-client munge``, ~10 s), then runs munged, slurmctld and slurmd as root with
every file (key, socket, config, state, logs) in a temporary directory and free ports, so nothing
under /etc is used and concurrent sessions do not collide. Client commands find the cluster through
``SLURM_CONF``. Jobs run on CPU with gloo: the launchers' GPU settings are overridden on the
``sbatch`` command line exactly as a user would on a CPU partition.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, child_env, run, tiny_corpus, tiny_hf, tiny_tokenizer
from tests.helpers.proc import free_port, torchrun_cmd

APT_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
SBATCH_LOCAL = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
                "--time=10"]  # the launchers' GPU-node settings, overridden for this CPU node


_run = functools.partial(run, timeout=60)  # Slurm's own commands answer in seconds


# the daemons live in /usr/sbin, which a user's PATH may lack
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "sinfo")


def _missing() -> list[str]:
    return [d for d in DAEMONS if not shutil.which(d, path=SEARCH_PATH)]


def _install() -> float:
    """apt-get install Slurm + munge when any of its programs is absent; the seconds it took."""
    if not _missing():
        return 0.0
    t0 = time.time()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    out = []
    lock = ["-o", "DPkg::Lock::Timeout=300"]  # wait for a concurrent apt/dpkg rather than fail
    for cmd in (["apt-get", *lock, "update", "-q"],
                ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]):
        p = run(cmd, env=env, timeout=600, check=False)
        out.append(f"$ {' '.join(cmd)}  (exit {p.returncode})\n{p.stdout[-6000:]}\n{p.stderr[-6000:]}")
        if p.returncode != 0:
            pytest.fail("installing Slurm failed:\n" + "\n".join(out), pytrace=False)
    if _missing():
        pytest.fail(f"apt-get install succeeded but {_missing()} are missing:\n" + "\n".join(out),
                    pytrace=False)
    return time.time() - t0


SLURM_CONF = """\
ClusterName=minitron
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={tmp}/munge.socket
StateSaveLocation={tmp}/ctld
SlurmdSpoolDir={tmp}/slurmd
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmctldLogFile={tmp}/slurmctld.log
SlurmdLogFile={tmp}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=3600
KillWait=5
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=60 State=UP
"""


class Cluster:
    """munged + slurmctld + slurmd on localhost, configured from a temporary directory."""

    def __init__(self):
        self.install_s = _install()
        # a short path: the munge socket path must stay under the 108-byte unix socket limit
        self.tmp = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.tmp / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), PATH=SEARCH_PATH)

    def start(self):
        t = self.tmp
        (t / "ctld").mkdir()
        (t / "slurmd").mkdir()
        key = t / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        _run([shutil.which("munged", path=SEARCH_PATH), f"--socket={t}/munge.socket", f"--key-file={key}",
              f"--pid-file={t}/munged.pid", f"--seed-file={t}/munged.seed", f"--log-file={t}/munged.log",
              "--force"])
        self.conf.write_text(SLURM_CONF.format(host=self.host, tmp=t, ctld_port=free_port(),
                                               slurmd_port=free_port()))
        _run(["slurmctld", "-f", str(self.conf)], env=self.env)
        _run(["slurmd", "-f", str(self.conf), "-N", self.host], env=self.env)
        if self.install_s:
            print(f"installed Slurm in {self.install_s:.1f} s")
        deadline = time.time() + 60
        while time.time() < deadline:
            p = _run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, check=False)
            if p.returncode == 0 and p.stdout.strip() == "idle":
                return self
            time.sleep(0.5)
        raise AssertionError(f"the Slurm node did not become idle:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(self.tmp.glob("*.log")))

    def stop(self):
        pids = []
        for name in ("slurmd", "slurmctld", "munged"):
            try:
                pids.append(int((self.tmp / f"{name}.pid").read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                continue
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 10
            while pids and time.time() < deadline:
                pids = [pid for pid in pids if _alive(pid)]
                time.sleep(0.1)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="session")
def slurm():
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        _run(["scancel", f"--user={os.getuid()}"], env=c.env, check=False)
        c.stop()


def _ensure_submitit_launcher():
    """Hydra's submitit launcher (the `slurm` extra; small, pure Python) for the sweep test."""
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        p = run([sys.executable, "-m", "pip", "install", "-q", "hydra-submitit-launcher>=1.2",
                 "submitit>=1.5"], timeout=600, check=False)
        if p.returncode != 0:
            pytest.fail(f"pip install hydra-submitit-launcher failed:\n{p.stdout}\n{p.stderr}", pytrace=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GQA checkpoint and an indexed corpus, shared by the jobs below."""
    from nemo_minitron.convert import checkpoint as ckpt
    from nemo_minitron.convert.hf_config import arch_from_hf_config

    tmp = tmp_path_factory.mktemp("slurm_jobs")
    hf = tiny_hf("gqa")  # hidden 128, ffn 256, 4 heads, 2 query groups, 4 layers
    ckpt.save(tmp / "ckpt", arch_from_hf_config(hf.config), hf.state_dict(), tokenizer=tiny_tokenizer())
    tiny_corpus(tmp / "corpus")
    return tmp


def prune_args(tiny: Path, out: Path, **targets) -> list[str]:
    """A quick `prune` of the tiny checkpoint (8 calibration samples of 32 tokens)."""
    return ["prune", "model.name=tiny", f"model.checkpoint={tiny / 'ckpt'}", f"data.prefix={tiny / 'corpus'}",
            "data.seq_length=32", "data.valid_fraction=0.1", "prune=none", "prune.calib_samples=8",
            "prune.micro_batch_size=2", f"output={out}", f"hydra.run.dir={out}.hydra",
            *(f"prune.target.{k}={v}" for k, v in targets.items())]


def job_env(cluster: Cluster, **extra) -> dict:
    """The submitting shell of a user: this interpreter first on PATH, the package importable."""
    env = dict(cluster.env, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), cluster.env["PATH"]]),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.update(extra)
    return env


def sbatch(cluster: Cluster, cwd: Path, *args, env=None) -> str:
    p = _run(["sbatch", "--parsable", f"--chdir={cwd}", f"--output={cwd}/%x-%j.out", *map(str, args)],
             env=env or job_env(cluster), cwd=cwd)
    return p.stdout.strip().split(";")[0]


def wait(cluster: Cluster, job_id: str, timeout: float = 180) -> dict:
    """Poll `scontrol show job` until the job has ended; its fields (JobState, ExitCode, ...)."""
    deadline = time.time() + timeout
    while True:
        p = _run(["scontrol", "show", "job", "-o", job_id], env=cluster.env, check=False)
        info = dict(kv.split("=", 1) for kv in p.stdout.split() if "=" in kv)
        if info.get("JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return info
        if time.time() > deadline:
            _run(["scancel", job_id], env=cluster.env, check=False)
            raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s:\n"
                                 f"{p.stdout}\n{cluster.logs()}")
        time.sleep(0.5)


def log_of(cwd: Path, job_id: str) -> str:
    files = list(cwd.glob(f"*-{job_id}.out"))
    return files[0].read_text() if files else "(no log)"


def check_pruned(out: Path, **expected):
    from nemo_minitron.convert import checkpoint as ckpt

    arch = ckpt.Checkpoint(out).arch
    for k, v in expected.items():
        assert getattr(arch, k) == v, (k, getattr(arch, k), v)
    assert (out / "plan.json").is_file() and (out / "importance.safetensors").is_file()


# (a) ---------------------------------------------------------------------------------------------

@pytest.mark.slurm
@pytest.mark.parametrize("script", ["minitron.sbatch", "minitron_torchrun.sbatch"])
def test_sbatch_prune_on_two_ranks(slurm, tiny, tmp_path, script):
    out = tmp_path / "pruned"
    if script == "minitron.sbatch":  # srun: one task per rank, TP=2
        opts, env = SBATCH_LOCAL, job_env(slurm)
        args = prune_args(tiny, out, hidden_size=96, ffn_hidden_size=160, num_attention_heads=2) + ["parallel.tp=2"]
        expected = dict(hidden_size=96, ffn_hidden_size=160, num_attention_heads=2, num_query_groups=2)
    else:  # torchrun: one task on the node starting 2 ranks, DP=2
        opts = ["--nodes=1", "--cpus-per-task=2", "--gpus-per-node=0", "--time=10"]
        env = job_env(slurm, NPROC_PER_NODE="2")
        args = prune_args(tiny, out, ffn_hidden_size=128)
        expected = dict(hidden_size=128, ffn_hidden_size=128, num_attention_heads=4)
    job = sbatch(slurm, tmp_path, *opts, ROOT / "launchers/slurm" / script, *args, env=env)
    info = wait(slurm, job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-6000:]
    assert ("2 task(s)" if script == "minitron.sbatch" else "1 node(s) x 2 rank(s)") in log
    check_pruned(out, **expected)


# (b) ---------------------------------------------------------------------------------------------

@pytest.mark.slurm
@pytest.mark.parametrize("fail_at", ["init", "collective"])
def test_sbatch_failing_rank_ends_the_job(slurm, tiny, tmp_path, fail_at):
    """Rank 1 raises; rank 0 waits for it (in the rendezvous, or in a barrier). With a 300 s
    collective timeout, only srun --kill-on-bad-exit ends rank 0 within the bound (fail_at=init)."""
    env = job_env(slurm, FAIL_AT=fail_at, MINITRON_CMD=f"{sys.executable} -u -m tests.workers.fail_rank1")
    t0 = time.time()
    job = sbatch(slurm, tmp_path, *SBATCH_LOCAL, ROOT / "launchers/slurm/minitron.sbatch",
                 *prune_args(tiny, tmp_path / "never"), "parallel.timeout_s=300", env=env)
    info = wait(slurm, job, timeout=150)
    elapsed = time.time() - t0
    log = log_of(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (info, log[-6000:])
    assert "injected failure on rank 1" in log, log[-6000:]
    assert elapsed < 120, f"the job took {elapsed:.0f} s to fail:\n{log[-6000:]}"
    assert not (tmp_path / "never").exists()


# (c) ---------------------------------------------------------------------------------------------

@pytest.mark.slurm
def test_hydra_submitit_sweep(slurm, tiny, tmp_path):
    """`minitron prune -m hydra/launcher=slurm`: one Slurm job per sweep point, 2 ranks each (TP=2)."""
    _ensure_submitit_launcher()
    stage, *overrides = prune_args(tiny, tmp_path / "unused")
    overrides = [a for a in overrides if not a.startswith(("output=", "hydra.run.dir="))]
    cmd = [sys.executable, "-m", "nemo_minitron", stage, "-m", "hydra/launcher=slurm",
           "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides, "parallel.tp=2",
           "prune.target.ffn_hidden_size=96,192", f"output={tmp_path}/ffn${{prune.target.ffn_hidden_size}}"]
    p = run(cmd, timeout=300, cwd=tmp_path, env=job_env(slurm), check=False)
    logs = "\n".join(f"--- {f}\n{f.read_text()[-3000:]}" for f in (tmp_path / "sweep").rglob("*_log.*"))
    assert p.returncode == 0, f"{p.stdout[-4000:]}\n{p.stderr[-4000:]}\n{logs}"
    for ffn in (96, 192):
        check_pruned(tmp_path / f"ffn{ffn}", ffn_hidden_size=ffn, hidden_size=128)
    # one job (array task) per sweep point, each run as 2 srun tasks
    assert len(list((tmp_path / "sweep" / ".submitit").glob("*_*/*_*_1_result.pkl"))) == 2, logs


# chain.sh ----------------------------------------------------------------------------------------

def chain(cluster, cwd, *args) -> list[tuple[str, str]]:
    p = _run(["bash", str(ROOT / "launchers/slurm/chain.sh"), *SBATCH_LOCAL, f"--chdir={cwd}",
              f"--output={cwd}/%x-%j.out", *map(str, args)], env=job_env(cluster), cwd=cwd)
    return [tuple(line.split()) for line in p.stdout.splitlines()]


@pytest.mark.slurm
def test_chain_runs_dependent_stages(slurm, tiny, tmp_path):
    # per-job sbatch options go between "--" and the stage: a one-rank prune here
    jobs = chain(slurm, tmp_path, "--", "--ntasks-per-node=1",
                 *prune_args(tiny, tmp_path / "pruned", ffn_hidden_size=64),
                 "--", "export", f"model.checkpoint={tmp_path / 'pruned'}", f"output={tmp_path / 'hf'}",
                 f"hydra.run.dir={tmp_path / 'hf.hydra'}")
    assert [stage for _, stage in jobs] == ["prune", "export"]
    prune_job, export_job = (job for job, _ in jobs)
    info = wait(slurm, export_job)
    assert info["JobState"] == "COMPLETED", log_of(tmp_path, prune_job) + log_of(tmp_path, export_job)
    assert info["NumTasks"] == "1"  # export is single-process: chain.sh gives it one task
    assert wait(slurm, prune_job)["NumTasks"] == "1"
    assert info["StartTime"] >= wait(slurm, prune_job)["EndTime"]  # ISO times: it ran after prune
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["intermediate_size"] == 64


@pytest.mark.slurm
def test_chain_cancels_stages_after_a_failure(slurm, tmp_path):
    jobs = chain(slurm, tmp_path, "--", "export", f"model.checkpoint={tmp_path / 'missing'}",
                 f"output={tmp_path / 'a'}", "--", "export", f"model.checkpoint={tmp_path / 'missing'}",
                 f"output={tmp_path / 'b'}")
    first, second = (job for job, _ in jobs)
    assert wait(slurm, first)["JobState"] == "FAILED"
    info = wait(slurm, second)
    assert info["JobState"] == "CANCELLED" and info["Reason"] == "DependencyNeverSatisfied", info


# (d) ---------------------------------------------------------------------------------------------

@pytest.mark.multirank
@pytest.mark.parametrize("fail_at", ["collective", "init"])
def test_torchrun_failing_rank_ends_the_job(tiny, tmp_path, fail_at):
    """No Slurm: torchrun's agent stops rank 0 once rank 1 has exited non-zero. (The request is
    a valid one: the pre-flight checks run before the stage's replaced `run`.)"""
    env = child_env(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", FAIL_AT=fail_at)
    cmd = torchrun_cmd("tests.workers.fail_rank1", 2, *prune_args(tiny, tmp_path / "out"),
                       "parallel.timeout_s=300")
    t0 = time.time()
    p = run(cmd, timeout=150, env=env, cwd=tmp_path, check=False)
    elapsed = time.time() - t0
    assert p.returncode != 0 and "injected failure on rank 1" in p.stderr + p.stdout, p.stderr[-6000:]
    assert elapsed < 120, f"torchrun took {elapsed:.0f} s to fail"

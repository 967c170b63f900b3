"""Process groups: read the launcher's environment, start torch.distributed and megatron's groups.

Works the same for ``python -m nemo_minitron`` (one process), ``torchrun`` (RANK/WORLD_SIZE/
LOCAL_RANK/MASTER_ADDR) and ``srun`` (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, master from the
node list). NCCL on GPUs, gloo on CPU, where :mod:`.cpu_compat` is applied first.

The device is chosen once per process by :func:`choose_device`: the CPU when there is no GPU,
when this node runs more ranks than it has GPUs (e.g. the multi-rank tests on a one-GPU host,
where ``set_device(local_rank)`` would fail), or when ``NEMO_MINITRON_DEVICE=cpu`` says so.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass

import torch

# the collectives callers reach as dist.barrier() etc. live in .collectives
from . import cpu_compat
from .collectives import (all_reduce_sum, barrier, broadcast_from_rank0,  # noqa: F401
                          end_collective_write)
from .parallel import Parallel, current

# megatron-core is imported inside the functions that use it: importing it takes seconds, and this
# module is imported (by the stages, preflight, the tests) long before a model is built.


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[017-018,020],cpu1' -> 'gpu017'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}")
    prefix, ranges = m.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def _slurm_master(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
        return out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return first_host(nodelist)


def read_env(environ=None) -> DistEnv:
    """Rank layout from torchrun's or Slurm's variables; a single process when neither is set."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        master = env.get("MASTER_ADDR") or _slurm_master(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                       int(env.get("SLURM_LOCALID", 0)), master, port)
    return DistEnv(0, 1, 0, "127.0.0.1", _free_port())


DEVICE_ENV = "NEMO_MINITRON_DEVICE"  # "cpu" or "cuda" forces the choice; unset: automatic


def local_world_size(environ=None) -> int:
    """Ranks the launcher started on this node (torchrun's LOCAL_WORLD_SIZE, Slurm's tasks per
    node); 1 for a plain process."""
    env = os.environ if environ is None else environ
    if "LOCAL_WORLD_SIZE" in env:
        return int(env["LOCAL_WORLD_SIZE"])
    if "SLURM_PROCID" in env:
        per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
        return int(re.match(r"\d+", per_node).group())  # "2(x3),1" -> 2: this node's share
    return 1


def choose_device(environ=None, gpus: int | None = None) -> str:
    """'cuda' or 'cpu' for this process (``gpus``: visible GPUs, counted without initialising
    CUDA when None)."""
    env = os.environ if environ is None else environ
    forced = env.get(DEVICE_ENV, "").strip().lower()
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if forced == "cuda" and gpus == 0:
        raise ValueError(f"{DEVICE_ENV}=cuda but no GPU is visible; unset it to run on the CPU")
    if forced in ("cpu", "cuda"):
        return forced
    if forced:
        raise ValueError(f"{DEVICE_ENV}={forced!r} is not a device; use 'cpu' or 'cuda', or "
                         "leave it unset to choose automatically")
    if gpus == 0:
        return "cpu"
    local = local_world_size(env)
    if local > gpus:
        logging.getLogger(__name__).warning(
            "%d ranks on this node but %d GPU(s): running on the CPU with gloo (set %s=cuda to "
            "refuse, or launch at most one rank per GPU)", local, gpus, DEVICE_ENV)
        return "cpu"
    return "cuda"


_NESTED = 0  # inits that reused a layout set up by an enclosing caller


def launched_world_size(environ=None) -> int:
    """Number of ranks the launcher (torchrun, srun) started; 1 for a plain process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_NTASKS"])
    return 1


def end_with_launcher() -> None:
    """Have the kernel send this rank SIGTERM when its parent (torchrun's agent, slurmstepd)
    dies. torchrun starts each rank in a session of its own, so a launcher killed with SIGKILL
    left its ranks training on, orphaned, and a relaunch on the same output ran beside them,
    both writing the same checkpoints. Linux only (elsewhere: nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def exit_on_failure(main_fn):
    """Run one rank's ``main_fn``; if it fails, end the process at once with ``os._exit``.

    For multi-rank jobs. A rank that fails while its peers wait in a collective has to exit for the
    launcher to stop the others (torchrun's agent, ``srun --kill-on-bad-exit=1``), but a normal
    interpreter exit can block first: destroying an NCCL process group flushes pending collectives
    (ncclCommFinalize, torch >= 2.6) and so waits for peers that never arrive, and so can a process
    group destructor, atexit handlers or non-daemon threads. So the error (already reported by
    Hydra, or printed here) is flushed and the process ends with the failure's exit code.
    """
    try:
        return main_fn()
    except SystemExit as e:
        if e.code is None or e.code == 0:
            raise
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:  # report it, then end this rank without the interpreter's teardown
        traceback.print_exc()
        code = 1
    logging.shutdown()  # flush log handlers (Hydra's <run dir>/<job>.log)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def init(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: int = 600, ep: int = 1) -> Parallel:
    """Start torch.distributed (if not yet) and megatron-core's model-parallel groups; ``ep``:
    expert-parallel ranks (MoE experts split over data-parallel ranks). Returns the
    :class:`~.parallel.Parallel` context the caller passes down."""
    from megatron.core import parallel_state as ps

    env = read_env()
    on_cuda = choose_device() == "cuda"
    if not on_cuda:
        cpu_compat.apply(hide_gpus=True)
    if env.world_size % (tp * pp):
        raise ValueError(f"world size {env.world_size} is not divisible by parallel.tp*parallel.pp="
                         f"{tp * pp}; launch a multiple of tp*pp processes")
    if (env.world_size // (tp * pp)) % ep:
        raise ValueError(f"parallel.ep={ep} does not divide the {env.world_size // (tp * pp)} "
                         "data-parallel ranks (experts are split over them); launch a multiple of "
                         "tp*pp*ep processes")
    if not torch.distributed.is_initialized():
        if on_cuda:
            torch.cuda.set_device(env.local_rank)
        torch.distributed.init_process_group(
            backend="nccl" if on_cuda else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank, world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s))
    global _NESTED
    if (ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() == tp
            and ps.get_pipeline_model_parallel_world_size() == pp
            and ps.get_expert_model_parallel_world_size() == ep):
        _NESTED += 1  # a caller already set up this layout: use it, and leave it to them
    else:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     expert_model_parallel_size=ep)
        _NESTED = 0
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current()


def release() -> None:
    """Undo the matching :func:`init`: drop megatron's model-parallel groups if that init made
    them (an init that found the same layout already set up leaves it to its owner).

    Library stages call this when done; only the process entry point (:func:`shutdown`) tears
    down torch.distributed, since re-creating a process group in the same job is not reliable.
    """
    global _NESTED
    if _NESTED > 0:
        _NESTED -= 1
        return
    ps = sys.modules.get("megatron.core.parallel_state")  # never imported: nothing to release
    if ps is not None and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def shutdown() -> None:
    """End of the process: model-parallel groups and the process group."""
    global _NESTED
    _NESTED = 0
    release()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_rank0() -> bool:
    """Rank 0 of the job (True in a single process). For code between stages, which holds no
    :class:`~.parallel.Parallel`; code inside a stage asks its context's ``is_rank0``."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

"""Resumable training state saved inside each training checkpoint, next to the student weights.

``train_state/`` holds ``state.json`` (step, samples consumed, scheduler state, layout and
optimizer kind),
``optim-tp{t}-pp{p}.pt`` (the optimizer state of each model-parallel shard, written by data-
parallel rank 0: without the distributed optimizer it is replicated across DP; with it, the DP
shards are first gathered per parameter name by :mod:`.optim_state`, so either way a run resumes
at another DP size), ``rng-rank{r}.pt`` and, for trainable modules that are not part
of the student checkpoint (the projections of intermediate distillation losses),
``<name>-tp{t}-pp{p}.pt``. Files are written in the checkpoint's
temporary directory and become visible only when the whole checkpoint is committed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as tdist

STATE = "train_state"


def _mp_name(prefix: str = "optim") -> str:
    from megatron.core import parallel_state as ps

    return f"{prefix}-tp{ps.get_tensor_model_parallel_rank()}-pp{ps.get_pipeline_model_parallel_rank()}.pt"


def _rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def writer(optimizer, scheduler, step: int, samples: int, layout: dict, extra: dict | None = None,
           modules: dict | None = None, named_params: dict | None = None):
    """A ``per_rank(tmp_dir)`` callback for :func:`~nemo_minitron.runtime.stage.save_checkpoint`.

    ``extra``: JSON-able loop state kept in state.json (the same on every rank); ``modules``:
    name -> module whose state_dict is saved per model-parallel shard; ``named_params``: the
    trained parameters by name (needed by the distributed optimizer's DP-independent form)."""
    from megatron.core import parallel_state as ps

    from . import optim_state

    def write(tmp: Path) -> None:
        d = tmp / STATE
        d.mkdir(exist_ok=True)
        dp0 = ps.get_data_parallel_rank() == 0
        if optim_state.is_distributed(optimizer):
            blob = optim_state.gather(optimizer, named_params)  # collective over DP
        else:
            blob = optimizer.state_dict() if dp0 else None
        if dp0:
            torch.save(blob, d / _mp_name())
            for name, module in (modules or {}).items():
                torch.save(module.state_dict(), d / _mp_name(name))
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
                   d / f"rng-rank{_rank()}.pt")
        if _rank() == 0:
            (d / "state.json").write_text(json.dumps(
                {"step": step, "samples": samples, "scheduler": scheduler.state_dict(),
                 "layout": layout, "extra": extra or {}}, indent=2))

    return write


def check_resume(path: Path, tp: int, pp: int, distributed_optimizer: bool) -> dict:
    """state.json of checkpoint ``path``, checked against this run's layout and optimizer before
    any model is loaded (the weights alone load at any layout; the training state does not)."""
    state = json.loads((Path(path) / STATE / "state.json").read_text())
    layout = state["layout"]
    if (layout["tp"], layout["pp"]) != (tp, pp):
        raise ValueError(f"{path} was written at tp={layout['tp']}, pp={layout['pp']}; optimizer "
                         f"state resumes only at the same tp/pp (now tp={tp}, pp={pp}); the "
                         "weights alone load at any layout")
    saved = bool(layout.get("distributed_optimizer", False))
    if saved != distributed_optimizer:
        was, now = ("with", "without") if saved else ("without", "with")
        raise ValueError(f"{path} was saved {was} the distributed optimizer and this run is "
                         f"{now} it; resume with train.distributed_optimizer="
                         f"{str(saved).lower()} (the weights alone load either way)")
    return state


def load(path: Path, state: dict, optimizer, scheduler, named_params: dict | None = None) -> None:
    """Restore optimizer, scheduler and RNG from checkpoint ``path`` (``state``: its state.json,
    from :func:`check_resume`)."""
    from . import optim_state

    d = Path(path) / STATE
    saved = torch.load(d / _mp_name(), weights_only=False)
    if optim_state.is_distributed(optimizer):
        optim_state.scatter(optimizer, saved, named_params)
    else:
        optimizer.load_state_dict(saved)
    scheduler.load_state_dict(state["scheduler"])
    rng = d / f"rng-rank{_rank()}.pt"
    if rng.exists():  # absent when resuming with more data-parallel ranks than were saved
        r = torch.load(rng, weights_only=False)
        torch.set_rng_state(r["cpu"])
        if r["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(r["cuda"])


def load_modules(path: Path, modules: dict) -> None:
    """Restore modules saved by :func:`writer` (``modules=``) for this model-parallel shard."""
    for name, module in modules.items():
        if not len(list(module.parameters())):
            continue
        f = Path(path) / STATE / _mp_name(name)
        if not f.is_file():
            raise ValueError(f"{path} holds no {f.name}: it was written without these {name} "
                             "(were kd.hidden_pairs / kd.embedding_weight changed?); resume with "
                             "the run's original kd settings or start a new output directory")
        module.load_state_dict(torch.load(f, weights_only=True))


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``run_dir/checkpoints`` (None if there is none)."""
    ckdir = Path(run_dir) / "checkpoints"
    done = sorted(p for p in ckdir.glob("step_*") if (p / STATE / "state.json").is_file()) \
        if ckdir.is_dir() else []
    return done[-1] if done else None


def prune_old(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (the newest is never deleted)."""
    import shutil

    ckdir = Path(run_dir) / "checkpoints"
    done = sorted(p for p in ckdir.glob("step_*") if (p / STATE / "state.json").is_file())
    for p in done[: max(len(done) - max(keep, 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)

"""Resumable training state saved inside each training checkpoint, next to the student weights.

``train_state/`` holds ``state.json`` (step, samples consumed, scheduler state, layout and
optimizer kind), ``optim-tp{t}-pp{p}.safetensors`` (the optimizer state of each model-parallel
shard, written by data-parallel rank 0: without the distributed optimizer it is replicated across
DP; with it, the DP shards are first gathered per parameter name by :mod:`.optim_state`, so
either way a run resumes at another DP size; under expert parallelism one
``optim-tp{t}-pp{p}-ep{e}.safetensors`` per EP rank, written by expert-DP rank 0, each holding
its experts and the dense state), ``rng-rank{r}.safetensors`` and, for trainable
modules that are not part of the student checkpoint (the projections of intermediate
distillation losses), ``<name>-tp{t}-pp{p}.safetensors``. All are :mod:`.state_file`s (tensors
plus a JSON tree, never pickle); checkpoints of the earlier pickle format (``*.pt``) are refused,
not read. Files are written in the checkpoint's temporary directory and become visible only when
the whole checkpoint is committed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open

from ..convert.checkpoint import Checkpoint
from . import optim_state, state_file

STATE = "train_state"


EXT = ".safetensors"
OLD_EXT = ".pt"  # the pickle format of earlier versions: refused, never unpickled


def _mp_name(prefix: str, tp_rank: int, pp_rank: int, ep_rank: int = 0, ep: int = 1) -> str:
    """A model-parallel shard's file; under expert parallelism each EP rank's optimizer holds
    other experts, so its file is its own."""
    return f"{prefix}-tp{tp_rank}-pp{pp_rank}" + (f"-ep{ep_rank}" if ep > 1 else "") + EXT


def _shard_name(par, prefix: str = "optim") -> str:
    """This rank's model-parallel shard file (``par``: the run's ``Parallel`` context)."""
    return _mp_name(prefix, par.tp_rank, par.pp_rank, par.ep_rank, par.ep)


def _writes_shard(par) -> bool:
    """One writer per model-parallel shard: DP rank 0, or under expert parallelism the first
    replica of each EP rank's experts (expert-data-parallel rank 0)."""
    return par.expert_dp_rank == 0 if par.ep > 1 else par.dp_rank == 0


def _rng_name(rank: int) -> str:
    return f"rng-rank{rank}{EXT}"


def writer(par, optimizer, scheduler, step: int, samples: int, layout: dict,
           extra: dict | None = None, modules: dict | None = None,
           named_params: dict | None = None):
    """A ``per_rank(tmp_dir)`` callback for :func:`~nemo_minitron.runtime.shard.save_checkpoint`.

    ``par``: the run's ``Parallel`` context; ``extra``: JSON-able loop state kept in state.json
    (the same on every rank); ``modules``: name -> module whose state_dict is saved per
    model-parallel shard; ``named_params``: the trained parameters by name (needed by the
    distributed optimizer's DP-independent form)."""
    def write(tmp: Path) -> None:
        d = tmp / STATE
        d.mkdir(exist_ok=True)
        dp0 = _writes_shard(par)
        if optim_state.is_distributed(optimizer):
            blob = optim_state.gather(optimizer, named_params)  # collective over DP
        else:
            blob = optimizer.state_dict() if dp0 else None
        if dp0:
            state_file.save(d / _shard_name(par), blob)
            for name, module in (modules or {}).items():
                state_file.save(d / _shard_name(par, name), dict(module.state_dict()))
        state_file.save(d / _rng_name(par.rank), par.rng_state())
        if par.rank == 0:
            (d / "state.json").write_text(json.dumps(
                {"step": step, "samples": samples, "scheduler": scheduler.state_dict(),
                 "layout": layout, "extra": extra or {}}, indent=2))

    return write


def data_order(data, train) -> dict:
    """The settings that decide which samples each step reads: a run resumed under others
    would train on another sample order from its checkpoint on (recorded in state.json)."""
    return {"data.seq_length": data.seq_length, "data.valid_fraction": data.valid_fraction,
            "train.global_batch_size": train.global_batch_size, "train.seed": train.seed}


def other_data_order(path: Path, want: dict) -> tuple[str, object, object] | None:
    """(field, saved, now) of the first setting in which checkpoint ``path`` was trained
    differently from ``want``; None when alike or unrecorded (older checkpoints)."""
    try:
        saved = json.loads((Path(path) / STATE / "state.json").read_text())["extra"]["data_order"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return next(((k, saved[k], v) for k, v in want.items() if k in saved and saved[k] != v), None)


def check_resume(path: Path, tp: int, pp: int, distributed_optimizer: bool, ep: int = 1) -> dict:
    """state.json of checkpoint ``path``, checked against this run's layout and optimizer before
    any model is loaded (the weights alone load at any layout; the training state does not)."""
    refuse_old_format(path)
    state = json.loads((Path(path) / STATE / "state.json").read_text())
    layout = state["layout"]
    saved = (layout["tp"], layout["pp"], layout.get("ep", 1))
    if saved != (tp, pp, ep):
        raise ValueError(f"{path} was written at tp={saved[0]}, pp={saved[1]}, ep={saved[2]}; "
                         f"optimizer state resumes only at the same tp/pp/ep (now tp={tp}, "
                         f"pp={pp}, ep={ep}); the weights alone load at any layout")
    saved = bool(layout.get("distributed_optimizer", False))
    if saved != distributed_optimizer:
        was, now = ("with", "without") if saved else ("without", "with")
        raise ValueError(f"{path} was saved {was} the distributed optimizer and this run is "
                         f"{now} it; resume with train.distributed_optimizer="
                         f"{str(saved).lower()} (the weights alone load either way)")
    return state


def load(par, path: Path, state: dict, optimizer, scheduler,
         named_params: dict | None = None) -> None:
    """Restore optimizer, scheduler and RNG from checkpoint ``path`` (``state``: its state.json,
    from :func:`check_resume`; ``par``: the run's ``Parallel`` context)."""
    d = Path(path) / STATE
    saved = state_file.load(d / _shard_name(par))
    if optim_state.is_distributed(optimizer):
        optim_state.scatter(optimizer, saved, named_params)
    else:
        optimizer.load_state_dict(saved)
    scheduler.load_state_dict(state["scheduler"])
    rng = d / _rng_name(par.rank)
    if rng.exists():  # absent when resuming with more data-parallel ranks than were saved
        par.set_rng_state(state_file.load(rng))


def load_modules(par, path: Path, modules: dict) -> None:
    """Restore modules saved by :func:`writer` (``modules=``) for this model-parallel shard."""
    for name, module in modules.items():
        if not len(list(module.parameters())):
            continue
        f = Path(path) / STATE / _shard_name(par, name)
        if not f.is_file():
            raise ValueError(f"{path} holds no {f.name}: it was written without these {name} "
                             "(were kd.hidden_pairs / kd.embedding_weight changed?); resume with "
                             "the run's original kd settings or start a new output directory")
        module.load_state_dict(state_file.load(f))


def refuse_old_format(path: Path) -> None:
    """Refuse a checkpoint whose training state is in the earlier pickle format: unpickling a
    file from a run directory can run arbitrary code, so it is not even opened."""
    d = Path(path) / STATE
    old = sorted(d.glob(f"*{OLD_EXT}")) if d.is_dir() else []
    if old and not any(d.glob(f"optim-*{EXT}")):
        raise ValueError(f"{old[0]} is training state in the old pickle format, which is not read "
                         f"(unpickling can run code); continue from its weights in a new run: "
                         f"model.checkpoint={path} output=<new dir>")


def unreadable(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be resumed from (None if it can): incomplete, truncated or
    corrupt weights, state.json or training-state files. Reads headers only (no tensor data)."""
    path = Path(path)
    refuse_old_format(path)
    try:
        ck = Checkpoint(path)
        for f in ck.files():
            try:  # checks that the header covers the whole file
                safe_open(str(path / f), framework="pt")
            except Exception as e:
                return f"{f}: {e}"
        state = json.loads((path / STATE / "state.json").read_text())
        layout = state["layout"]
        int(state["step"])
        d = path / STATE
        ep = layout.get("ep", 1)
        need = [d / _mp_name("optim", t, p, e, ep) for t in range(layout["tp"])
                for p in range(layout["pp"]) for e in range(ep)]
        need += [d / _rng_name(r) for r in range(layout["tp"] * layout["pp"] * layout.get("dp", 1))]
        for f in need:
            if not f.is_file():
                return f"{f.name} is missing"
        for f in sorted(set(need) | set(d.glob(f"*{EXT}"))):
            state_file.check(f)
    except Exception as e:  # any failure means: not this one, try an older checkpoint
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def saved(run_dir: Path) -> list[Path]:
    """Committed checkpoints under ``run_dir/checkpoints``, oldest first (readable or not)."""
    ckdir = Path(run_dir) / "checkpoints"
    return sorted(p for p in ckdir.glob("step_*") if (p / STATE / "state.json").is_file()) \
        if ckdir.is_dir() else []


def latest(run_dir: Path) -> Path | None:
    """The newest committed checkpoint under ``run_dir/checkpoints`` (None if there is none)."""
    done = saved(run_dir)
    return done[-1] if done else None


def prune_old(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (the newest is never deleted).

    The loop saves only finite weights (:mod:`.guard`), so the newest kept one is the last
    finite one."""
    done = saved(run_dir)
    for p in done[: max(len(done) - max(keep, 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)

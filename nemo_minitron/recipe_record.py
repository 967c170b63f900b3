"""What a chained job's run directory was made with, so that a resumed job cannot mix recipes.

``minitron pipeline`` skips every step whose output is complete, so a relaunch with another
``train.steps`` or ``prune.target`` would silently report the old student under the new
settings. The first invocation writes ``recipe.json`` (every setting that decides a step's output,
flattened to dotted keys); a later one with other values stops before anything is loaded, naming
the settings that differ and the fix, unless no completed step depends on them: a distillation
that diverged or was killed may be relaunched with another ``train.lr`` (``train.*``/``kd.*``
decide distillations; everything else decides pruning and all that follows).

Left out, free to change between invocations: how the job runs (the parallel layout, micro-batch
size, distributed optimizer, ``model.dtype``, which ``auto`` resolves per machine), what it logs
and how often it saves (``train.log_interval`` and the like), whether it exports, ``output``
itself, and ``eval.*``: an evaluation made with other settings is run again instead
(:meth:`.runs.Steps.evaluate`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from .artifacts.atomic import read_json, write_json

log = logging.getLogger(__name__)

RECORD = "recipe.json"
LOG_DIR = "hydra"  # <output>/hydra/<time>/: each invocation's config and log (cli.record_run)
FORMAT = "nemo_minitron.recipe/1"

FREE = ("parallel.tp", "parallel.pp", "parallel.ep", "parallel.timeout_s", "output", "model.dtype",
        "eval.", "train.log_interval", "train.eval_interval", "train.eval_batches",
        "train.save_interval", "train.keep_checkpoints", "train.sharded_save", "train.tensorboard",
        "train.wandb", "train.skip_nonfinite_steps", "train.micro_batch_size",
        "train.distributed_optimizer",
        "search.only", "search.plan_only", "pipeline.export")


def _flat(value, prefix: str, out: dict) -> dict:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = json.loads(json.dumps(value, default=str))  # lists and tuples alike
    return out


def recipe(job) -> dict:
    """The settings of ``job`` that decide what its steps write (see the module note)."""
    return {k: v for k, v in _flat(job, "", {}).items()
            if not any(k == f.rstrip(".") or k.startswith(f) for f in FREE)}


def _kind(key: str) -> str:
    """Which completed steps a setting decides: ``train`` (distillations, teacher correction,
    search candidates' short runs) or ``prune`` (everything from the model on)."""
    return "train" if key.startswith(("train.", "kd.")) else "prune"


def _done_kinds(out: Path) -> set[str]:
    """The kinds of step (:func:`_kind`) that have a complete output under ``out``."""
    from .convert.checkpoint import META

    kinds = set()
    if any(out.rglob(f"final/{META}")):  # a distillation, a candidate's, or teacher correction
        kinds |= {"train", "prune"}
    if any(out.rglob(f"pruned/{META}")) or any(out.rglob("chosen.json")):
        kinds.add("prune")
    return kinds


def _show(v) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def _read(path: Path) -> dict:
    try:
        kept = read_json(path)
        if kept.get("format") != FORMAT:
            raise ValueError("not a recipe record")
        return kept["recipe"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ValueError(f"{path}: unreadable ({e}); remove it to resume with this "
                         "command's settings, or pass a new output=") from None


def _holds_steps(out: Path) -> bool:
    """Whether ``out`` holds anything besides the log folder the stage opened before this
    check (``hydra/<time>/``): a fresh run has that folder and nothing else."""
    return out.is_dir() and any(p.name != LOG_DIR for p in out.iterdir())


def refuse(job, out: Path) -> tuple[dict | None, dict, list[str]]:
    """Raise ``ValueError`` (one line) when ``out`` holds a run made with another recipe; writes
    nothing, so preflight can call it before the stage opens its log folder. Returns the kept
    recipe (None without one), this job's, and the settings that differ between them."""
    out = Path(out)
    path = out / RECORD
    now = recipe(job)
    was = _read(path) if path.is_file() else None
    changed = [] if was is None else sorted(k for k in set(was) | set(now)
                                            if was.get(k) != now.get(k))
    if changed and any(_kind(k) in _done_kinds(out) for k in changed):
        shown = ", ".join(f"{k}={_show(was.get(k))} (now {_show(now.get(k))})"
                          for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ValueError(
            f"output={out} holds a run made with {shown}{more}; its completed steps would be "
            f"kept under the new settings. Pass a new output= (or remove {out}) to start "
            f"over, or resume with the old values")
    return was, now, changed


def check(job, out: Path) -> None:
    """:func:`refuse`, then write the record when there is none yet or it changes (rank 0;
    every rank checks the same file)."""
    from .runtime import dist

    out = Path(out)
    path = out / RECORD
    was, now, changed = refuse(job, out)
    if was is not None and not changed:
        return
    if dist.is_rank0():
        if changed:  # nothing that depends on them is complete (a diverged or killed
            # distillation relaunched with a lower lr, say): resume with the new values
            log.info("%s: resuming with %s changed; no completed step depends on them", out,
                     ", ".join(changed))
        elif _holds_steps(out):
            log.warning("%s holds a run without %s (made before runs recorded their settings): "
                        "taking this command's settings as the ones it was made with", out,
                        RECORD)
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, {"format": FORMAT, "recipe": now})
    dist.barrier()

"""What a training run directory holds before training starts, and what to do about it.

A run directory (``output=``) collects ``checkpoints/step_*`` (resumable), ``final/``,
``metrics.jsonl`` and reports. Before any model is loaded :func:`prepare` decides, from small files
only: a finished run (``final/`` at or past ``train.steps``) is left alone; leftovers of saves that
were killed (``.<name>.partial-*``, the temporary names of :func:`~nemo_minitron.convert.
checkpoint.prepare_output`) are removed and reported; the run resumes from the newest checkpoint
that is complete and readable, moving unreadable newer ones aside with a warning;
``overwrite=true`` clears what an earlier run trained. Every rank calls it and reaches the same
decision; only rank 0 changes files.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..artifacts.atomic import write_text
from ..convert import checkpoint as ckpt
from ..runtime import dist
from . import train_state

log = logging.getLogger(__name__)

# what training writes into its run directory (cleared by overwrite=true; nothing else is touched)
TRAINED = ("checkpoints", "final", "metrics.jsonl", "tb", "report.md", "training.png")


@dataclass
class Plan:
    resume_from: Path | None = None
    state: dict | None = None
    finished: dict | None = None  # final/'s minitron.json when there is nothing left to do


def _rank0() -> bool:
    return dist.read_env().rank == 0


def clean_partials(run_dir: Path) -> list[Path]:
    """Remove temporary directories of saves that never committed (a process killed while
    saving); returns what was found. Every rank sees the same list; rank 0 deletes."""
    found = ckpt.partials(run_dir) + ckpt.partials(run_dir / "checkpoints")
    if found and _rank0():
        log.warning("removing %d unfinished save(s) left by an interrupted run: %s", len(found),
                    ", ".join(str(p) for p in found))
        ckpt.remove_partials(found)
    return found


def newest_readable(run_dir: Path) -> Path | None:
    """The newest checkpoint that is complete and readable; newer unreadable ones (truncated by a
    full disk, a broken copy) are renamed ``.<name>.unreadable`` so they are neither resumed
    from nor overwritten, and reported."""
    for p in reversed(train_state.saved(run_dir)):
        why = train_state.unreadable(p)
        if why is None:
            return p
        if _rank0():
            aside = p.with_name(f".{p.name}.unreadable")
            log.warning("checkpoint %s cannot be resumed from (%s); moved aside to %s, trying "
                        "the previous one", p, why, aside)
            shutil.rmtree(aside, ignore_errors=True)
            p.rename(aside)
    return None


def final_meta(run_dir: Path) -> dict | None:
    final = run_dir / "final"
    try:
        return json.loads((ckpt.check_dir(final) / ckpt.META).read_text())
    except (ValueError, OSError):
        return None


def prepare(run_dir, steps: int, resume: bool, overwrite: bool, tp: int, pp: int,
            distributed_optimizer: bool, ep: int = 1) -> Plan:
    """Decide how this run starts (see the module docstring); raises ValueError with the fix."""
    run_dir = Path(run_dir)
    if overwrite:
        if _rank0() and run_dir.is_dir():
            for name in TRAINED:
                p = run_dir / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return Plan()
    meta = final_meta(run_dir)
    if meta is not None and int(meta.get("step", -1)) >= steps:
        return Plan(finished=meta)
    clean_partials(run_dir)
    resume_from = newest_readable(run_dir) if resume else None
    if not resume and train_state.saved(run_dir):
        raise ValueError(f"{run_dir}/checkpoints holds an earlier run and resume=false would "
                         "train over it: pass overwrite=true to start again, or another output")
    if resume_from is None and (run_dir / "final").exists():
        raise ValueError(f"{run_dir}/final was trained for {(meta or {}).get('step', '?')} steps "
                         f"and there is no checkpoint to continue it to train.steps={steps}: pass "
                         "overwrite=true to retrain, or continue from its weights in a new run "
                         f"(model.checkpoint={run_dir}/final output=<new dir>)")
    state = None if resume_from is None else train_state.check_resume(
        resume_from, tp, pp, distributed_optimizer, ep)
    if meta is not None and resume_from is not None and _rank0():
        log.warning("%s/final was trained for %s steps; continuing to train.steps=%d from %s "
                    "(final/ keeps no optimizer state, so the steps after that checkpoint are "
                    "trained again, under the new schedule)", run_dir, meta.get("step", "?"),
                    steps, resume_from.name)
    return Plan(resume_from=resume_from, state=state)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics.jsonl rows past ``step`` (rank 0): a resumed run logs those steps again."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.is_file():
        return
    lines = f.read_text(errors="replace").splitlines()
    keep = [x for x in lines if _step_of(x) <= step]
    if len(keep) != len(lines):
        write_text(f, "".join(x + "\n" for x in keep))


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except ValueError:  # a row cut short by a killed process: dropped
        return float("inf")

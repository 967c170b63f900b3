"""Numerical guard of the training loop: a diverged run stops instead of ending as a "model".

Before the optimizer applies a step, the loss (already reduced over all ranks and pipeline
stages) and every rank's gradients are checked for non-finite values; the verdict is all-reduced,
so every rank takes the same decision in the same step. A bad step is skipped (no update) while
``train.skip_nonfinite_steps`` allows, otherwise training stops with :class:`TrainingDiverged`
before anything of that step is saved. Weights are checked again before every save, so no
checkpoint holds non-finite weights and keep-checkpoints retention, which deletes only older
checkpoints after a newer one is saved, can never drop the last finite one.
"""

from __future__ import annotations

import logging
import math

import torch

from ..dtypes import all_finite as _all_finite  # the guard's check (benchmarks, tests)
from ..runtime import dist
from ..runtime.dist import read_env
from ..runtime.forward import all_reduce_sum
from .train_state import latest

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Raised identically on every rank; its message names the step, the last good checkpoint
    and the settings to change."""

    same_on_all_ranks = True  # the CLI prints it once (rank 0)


def require_finite(field: str, path, module) -> None:
    """Collective; after loading. A checkpoint with NaN or inf weights trained one step and
    ended as "diverged at step 1, lower train.lr": the advice of a run that went bad, not of an
    input that was."""
    bad = next((n for n, p in module.named_parameters() if not _all_finite([p])), None)
    if _bad_ranks(bad is None):
        where = f" (first: {bad})" if bad else " on another rank"
        raise ValueError(f"{field}={path} holds non-finite weights (NaN or inf){where}; it "
                         "cannot be trained: use the checkpoint it came from, or the last good "
                         "checkpoint of the run that wrote it")


def _bad_ranks(local_ok: bool) -> int:
    return int(all_reduce_sum(torch.tensor([0.0 if local_ok else 1.0], dtype=torch.float64))[0])


def grad_tensors(ddp) -> list:
    """The gradient buffers of megatron's DDP (each rank's reduced gradients, or its shard of
    them with the distributed optimizer: a non-finite input anywhere shows up in some shard)."""
    bufs = list(getattr(ddp, "buffers", [])) + list(getattr(ddp, "expert_parallel_buffers", []))
    if bufs:
        return [b.grad_data for b in bufs]
    return [getattr(p, "main_grad", p.grad) for p in ddp.module.parameters()]


class Guard:
    def __init__(self, train_cfg, run_dir, skipped: int = 0):
        self.tr, self.run_dir, self.skipped = train_cfg, run_dir, skipped

    def step_ok(self, step: int, metrics: dict, ddp) -> bool:
        """Collective. True: apply step ``step``; False: skip it; raises when out of skips."""
        bad = _bad_ranks(_all_finite(grad_tensors(ddp)))
        losses = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
        if not bad and not losses:
            return True
        what = [f"{k} {v}" for k, v in losses.items()]
        what += [f"non-finite gradients on {bad} of {read_env().world_size} rank(s)"] if bad else []
        what = ", ".join(what)
        if self.skipped < self.tr.skip_nonfinite_steps:
            self.skipped += 1
            if dist.is_rank0():
                log.warning("step %d skipped (%s): %d of train.skip_nonfinite_steps=%d used",
                            step, what, self.skipped, self.tr.skip_nonfinite_steps)
            return False
        raise TrainingDiverged(self.message(step, what))

    def check_grad_norm(self, step: int, grad_norm) -> None:
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise TrainingDiverged(self.message(step, f"grad norm {float(grad_norm)}"))

    def check_weights(self, step: int, module) -> None:
        """Collective; before a save."""
        if _bad_ranks(_all_finite(module.parameters())):
            raise TrainingDiverged(self.message(step, "weights became non-finite"))

    def message(self, step: int, what: str) -> str:
        tr = self.tr
        good = latest(self.run_dir)
        where = (f"the last good checkpoint is {good} (a rerun resumes from it)" if good else
                 "no checkpoint was saved before it (train.save_interval="
                 f"{tr.save_interval}), so a rerun starts over")
        fixes = [f"lower train.lr (now {tr.lr:g})"]
        if tr.clip_grad <= 0:
            fixes.append("enable gradient clipping with train.clip_grad=1.0 (now 0: off)")
        fixes.append(f"raise train.warmup_steps (now {tr.warmup_steps})")
        if not tr.skip_nonfinite_steps:
            fixes.append("or let train.skip_nonfinite_steps=N skip a few such steps")
        return (f"training diverged at step {step} ({what}); nothing from this step was saved; "
                f"{where}; to fix: {', '.join(fixes)}")

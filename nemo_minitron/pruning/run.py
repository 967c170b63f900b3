"""The `minitron prune` command: calibrate (or load/randomise scores), plan, slice, save — at any
layout.

Every rank runs :func:`prune`; each pipeline stage slices its own layers and writes its own
shard, so the full model never has to fit on one rank.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from ..artifacts import atomic
from ..convert import checkpoint as ckpt
from ..importance.reduce import SCORES_FILE, Importance
from .select import make_plan, random_importance

log = logging.getLogger(__name__)


def prune(job) -> dict:
    """The `minitron prune` command: check, calibrate, plan, slice and save; returns the output
    checkpoint and the parameter counts."""
    from ..runtime import dist
    from ..runtime.shard import load_checkpoint

    # Everything that can be wrong with the request is checked before any model is loaded.
    src = ckpt.Checkpoint(job.model.checkpoint)
    src.arch.check_parallel(job.parallel.tp, job.parallel.pp, job.parallel.ep)
    if job.prune.target.resolve(src.arch) == src.arch and job.prune.keep_layers is None:
        log.warning("prune.target keeps every size of %s: the output is an unpruned copy with its "
                    "importance scores; set a smaller size to prune, e.g. "
                    "prune.target.ffn_hidden_size=%d", src.path, src.arch.ffn_hidden_size // 2)
    atomic.check_new_dir(job.output, job.overwrite)
    data = calibration_data(job)

    par = dist.init(job.parallel.tp, job.parallel.pp, job.parallel.seed, job.parallel.timeout_s,
                    ep=job.parallel.ep)
    try:
        t0 = time.time()
        stage, _ = load_checkpoint(job.model.checkpoint, job.model.dtype)
        imp = importance_for(job, stage, src.arch, data, par)
        t_cal = time.time() - t0
        depth = choose_depth(job, stage, src, par)
        plan = plan_for(job, src, imp, depth)
        summary = summarize(src, plan, t_cal)
        out = save_pruned(job, stage, src, imp, plan, depth, summary, par)
        if par.is_rank0:
            log.info("pruned %s -> %s: %.1fM -> %.1fM parameters (non-embedding %.1fM -> %.1fM)",
                     src.path, out, summary["source_params"] / 1e6, summary["target_params"] / 1e6,
                     summary["source_non_embedding"] / 1e6, summary["target_non_embedding"] / 1e6)
        return {"checkpoint": str(out), **summary}
    finally:
        dist.release()


@dataclass
class Depth:
    """Which layers depth pruning keeps: ``keep_layers`` given or chosen from ``curve``, the cost
    (loss, or negated accuracy) of removing the ``n_drop``-layer block at each start; ``curve`` is
    None when nothing was measured."""

    keep_layers: list | None
    curve: list | None
    n_drop: int


def choose_depth(job, stage, src, par) -> Depth:
    """The kept layers, from prune.keep_layers or by scoring every contiguous block's removal
    (prune.depth=lm_loss or accuracy); block_importance leaves the choice to make_plan."""
    from ..data.packed import PackedSequences
    from .depth import best_block, block_removal_accuracy, block_removal_losses

    p = job.prune
    n_drop = src.arch.num_layers - (p.target.num_layers or src.arch.num_layers)
    if p.keep_layers is not None or n_drop <= 0 or p.depth not in ("lm_loss", "accuracy"):
        return Depth(p.keep_layers, None, n_drop)
    if p.depth == "lm_loss":
        valid = PackedSequences(job.data.prefix, job.data.seq_length, split="valid",
                                valid_fraction=job.data.valid_fraction)
        n = min(p.depth_batches, len(valid) // (p.micro_batch_size * par.dp))
        if n < p.depth_batches and par.is_rank0:  # more would repeat the same batches
            log.info("prune.depth_batches=%d: the held-out split holds %d; each block is scored "
                     "on those", p.depth_batches, n)
        vb = list(valid.batches(p.micro_batch_size, num_batches=n,
                                dp_rank=par.dp_rank, dp_size=par.dp))
        curve = block_removal_losses(stage, vb, n_drop, par=par)
    else:
        from ..evaluate.tasks import load_task

        items = load_task(p.depth_task, limit=p.depth_task_limit)
        accs = block_removal_accuracy(stage, src.tokenizer(), items, n_drop, par=par)
        curve = [-a for a in accs]  # best block = the smallest accuracy drop
    return Depth(best_block(curve, n_drop, src.arch.num_layers), curve, n_drop)


def plan_for(job, src, imp, depth: Depth):
    """The pruning plan, with the depth curve and where the scores came from in its meta."""
    p = job.prune
    plan = make_plan(src.arch, imp, p.target, keep_layers=depth.keep_layers,
                     contiguous=p.contiguous)
    if depth.curve is not None and p.depth == "lm_loss":
        plan.meta["depth_lm_loss"] = {"block": depth.n_drop, "loss_by_start": depth.curve}
    elif depth.curve is not None:
        plan.meta["depth_accuracy"] = {"block": depth.n_drop, "task": p.depth_task,
                                       "acc_norm_by_start": [-c for c in depth.curve]}
    plan.meta.update(parent=str(src.path), importance_mode="scores" if p.scores else p.importance)
    return plan


def summarize(src, plan, t_cal: float) -> dict:
    tgt = plan.target
    return {"source_params": src.arch.num_params(), "target_params": tgt.num_params(),
            "source_active": src.arch.num_active_params(),
            "target_active": tgt.num_active_params(),
            "source_non_embedding": src.arch.num_params(embeddings=False),
            "target_non_embedding": tgt.num_params(embeddings=False),
            "dropped_layers": plan.meta["dropped_layers"], "calibration_s": round(t_cal, 1)}


def save_pruned(job, stage, src, imp, plan, depth: Depth, summary: dict, par):
    """Each rank slices its own layers into the output checkpoint, with the plan, the scores, the
    report and its plots beside it."""
    from ..report.plots import plot_depth_curve, plot_importance
    from ..report.stages import prune_report
    from ..runtime.shard import save_checkpoint
    from .apply import apply_plan

    p, tgt, curve = job.prune, plan.target, depth.curve
    kept = [i for i in stage.layers if i in plan.layers]

    def transform(canonical):
        return apply_plan(plan, canonical, layers=kept, include_embedding=stage.pre_process,
                          include_head=stage.post_process)

    plots = ["importance.png"] + (["depth_curve.png"] if curve is not None else [])
    extra = {"plan.json": plan.save, SCORES_FILE: imp.save}
    if curve is not None:
        extra["depth_curve.png"] = lambda f: plot_depth_curve(
            curve if p.depth == "lm_loss" else [-c for c in curve], depth.n_drop, f,
            ylabel="validation loss" if p.depth == "lm_loss" else f"{p.depth_task} acc_norm")
    extra["report.md"] = lambda f: prune_report(
        f, source_path=src.path, source=src.arch, target=tgt, summary=summary, plots=plots,
        importance_mode=plan.meta["importance_mode"])
    extra["importance.png"] = lambda f: plot_importance(
        imp, f, dropped_layers=plan.meta["dropped_layers"],
        title=f"{job.model.name}: {src.arch.num_params() / 1e6:.1f}M -> "
              f"{tgt.num_params() / 1e6:.1f}M")
    return save_checkpoint(
        stage, job.output, tokenizer=src.tokenizer(required=False) if par.is_rank0 else None,
        overwrite=job.overwrite, arch=tgt, transform=transform,
        provenance={"stage": "prune", "parent": str(src.path), "importance": imp.meta,
                    "summary": summary},
        extra_files=extra)


def calibration_data(job):
    """The training split calibration reads, or None when the scores come from elsewhere."""
    from ..data.packed import PackedSequences

    if job.prune.scores or job.prune.importance != "activation":
        return None
    return PackedSequences(job.data.prefix, job.data.seq_length, split="train",
                           valid_fraction=job.data.valid_fraction)


def importance_for(job, stage, arch, data, par):
    """The job's importance scores: loaded (prune.scores), random, or calibrated on ``data``
    (split over ``par``'s data-parallel ranks)."""
    from ..importance.calibrate import batches_forward_loop, calibrate

    p = job.prune
    if p.scores:
        return Importance.load(p.scores)
    if p.importance == "random":
        return random_importance(arch, p.seed)
    gb = p.micro_batch_size * par.dp
    n = min(math.ceil(p.calib_samples / gb), len(data) // gb)
    if n * gb < p.calib_samples:
        log.warning("calibration: the training split holds %d samples of %d tokens; "
                    "using %d instead of %d", len(data), job.data.seq_length, n * gb,
                    p.calib_samples)
    batches = data.batches(p.micro_batch_size, num_batches=n, dp_rank=par.dp_rank,
                           dp_size=par.dp)
    return calibrate(stage, batches_forward_loop(stage, batches), seq_agg=p.seq_agg,
                     batch_agg=p.batch_agg, par=par)


def calibrate_to(job, path) -> Importance:
    """Calibrate the job's model once and save the scores to ``path`` (atomically, on rank 0):
    the architecture search prunes every candidate from these."""
    from ..runtime import dist
    from ..runtime.shard import load_checkpoint

    src = ckpt.Checkpoint(job.model.checkpoint)
    src.arch.check_parallel(job.parallel.tp, job.parallel.pp, job.parallel.ep)
    data = calibration_data(job)
    par = dist.init(job.parallel.tp, job.parallel.pp, job.parallel.seed, job.parallel.timeout_s,
                    ep=job.parallel.ep)
    try:
        stage, _ = load_checkpoint(job.model.checkpoint, job.model.dtype)
        imp = importance_for(job, stage, src.arch, data, par)
        if par.is_rank0:
            imp.save(path)
        dist.barrier()
        return imp
    finally:
        dist.release()

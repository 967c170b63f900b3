"""The whole recipe in one job: teacher correction -> prune -> distill -> evaluate -> export,
round after round (each round's distilled student is the next round's teacher).

Every step writes its output under the run directory atomically; a step whose output is
complete is skipped, so an interrupted pipeline resumes where it stopped (and distillation
resumes from its latest checkpoint).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from .artifacts import atomic
from .artifacts.evaluation import task_scores
from .artifacts.pipeline_files import STAGE_SECONDS, write_summary
from .artifacts.search_files import CHOSEN, read_chosen
from .config.schema import (DistillJob, FinetuneJob, PruneJob, RoundConfig, SearchJob)
from .convert import checkpoint as ckpt
from .report.judge import mean_retained, mean_retained_stderr, task_rows
from . import recipe_record
from .runs import Steps, complete, on_rank0, with_checkpoint
from .search import shared_cache

log = logging.getLogger(__name__)


def run_pipeline(job) -> dict:
    """The `minitron pipeline` command: check every round, correct the teacher, then per round
    prune (or search), distill, evaluate and export; writes summary.json and report.md."""
    from . import preflight

    preflight.pipeline(job)  # every round, before teacher correction trains anything
    out = Path(job.output)
    recipe_record.check(job, out)  # a relaunch resumes the same recipe, or stops here
    clear_partials(out)
    t0 = time.time()
    steps = Steps(out / STAGE_SECONDS)
    teacher = correct_teacher(job, out, steps)
    rounds = job.pipeline.rounds or [RoundConfig(target=job.prune.target)]
    summary = {"rounds": [], "teacher": str(job.model.checkpoint)}
    for i, rnd in enumerate(rounds, 1):
        student, row = run_round(job, i, out / (rnd.name or f"round{i}"), rnd, teacher, steps)
        summary["rounds"].append(row)
        teacher = student  # each round's distilled student is the next round's teacher
    every = steps.recorded()  # a resumed run: the steps of earlier invocations too
    summary.update(seconds=round(time.time() - t0, 1), stage_seconds=steps.seconds,
                   stage_seconds_all=every, seconds_all=round(sum(every.values()), 1))
    on_rank0(lambda: write_summary(out, summary))
    write_pipeline_report(out, summary)
    return summary


def clear_partials(out: Path) -> None:
    """Remove the unfinished saves of any step killed in an earlier invocation (rank 0)."""
    from .runtime import dist

    if dist.is_rank0():
        out.mkdir(parents=True, exist_ok=True)
        stale = atomic.partials(out, recursive=True)
        if stale:
            log.warning("removing %d unfinished save(s) left by an interrupted run: %s",
                        len(stale), ", ".join(map(str, stale)))
        atomic.remove_partials(stale)
    dist.barrier()


def correct_teacher(job, out: Path, steps: Steps) -> Path:
    """The first round's teacher: the model itself, or with pipeline.teacher_correction_steps the
    model finetuned on the distillation corpus."""
    from .distill.trainer import train

    teacher = Path(job.model.checkpoint)
    if not job.pipeline.teacher_correction_steps:
        return teacher
    corrected = out / "teacher_correction"
    ft = FinetuneJob(model=with_checkpoint(job.model, teacher), parallel=job.parallel,
                     data=job.data,
                     train=dataclasses.replace(job.train,
                                               steps=job.pipeline.teacher_correction_steps),
                     output=str(corrected))
    steps.run("teacher correction", complete(corrected / "final"), lambda: train(ft, "finetune"))
    return corrected / "final"


def run_round(job, i: int, rd: Path, rnd: RoundConfig, teacher: Path, steps: Steps):
    """One round under ``rd``: (the distilled student, the round's row of summary.json)."""
    from .distill.trainer import train
    from .runtime import dist

    job = round_cache(job, i, rd, rnd, teacher, steps)
    pruned, searched = prune_round(job, i, rd, rnd, teacher, steps)
    distilled = rd / "distill"
    dj = DistillJob(model=with_checkpoint(job.model, pruned), parallel=job.parallel,
                    data=job.data, train=job.train,
                    kd=dataclasses.replace(job.kd, teacher=str(teacher)), output=str(distilled))

    def distill():
        shared_cache.check_before_distill(dj, pruned)
        return train(dj, "distill")

    steps.run(f"round {i}: distill", complete(distilled / "final"), distill)
    student = distilled / "final"
    evals = {name: steps.evaluate(f"round {i}: evaluate {name}", ck, rd / f"eval_{name}.json", job)
             for name, ck in (("teacher", teacher), ("pruned", pruned), ("distilled", student))}
    if job.pipeline.export:
        from .convert.hf import export_hf

        hf = rd / "hf"
        steps.run(f"round {i}: export", (hf / "config.json").is_file(),
                  lambda: export_hf(str(student), hf) if dist.is_rank0() else None)
        dist.barrier()
    student_arch = ckpt.Checkpoint(student).arch
    scored = {k: v for k, v in evals.items() if "tasks" in v}
    return student, {
        "name": rd.name, "teacher": str(teacher), "student": str(student),
        "params": {"teacher": ckpt.Checkpoint(teacher).arch.num_params(),
                   "student": student_arch.num_params()},
        "arch": student_arch.to_dict(),
        "search": searched,
        "pruned_dir": str(pruned),
        "val_loss": {k: v["loss"] for k, v in evals.items()},
        "tasks": {k: task_scores(v) for k, v in scored.items()},
        "task_table": task_rows(scored),
        "task_table_acc": task_rows(scored, "acc")}


def round_cache(job, i: int, rd: Path, rnd: RoundConfig, teacher: Path, steps: Steps):
    """With pipeline.teacher_cache=round: ``job`` whose kd.teacher_cache is the round's teacher
    cache (built now unless complete), covering the round's distillation and its search, whose
    candidates then read it too (search.teacher_cache). Otherwise ``job`` itself."""
    from .distill import teacher_cache as tc

    if job.pipeline.teacher_cache != "round" or job.kd.teacher_cache:
        return job
    n = max(job.train.steps, shared_cache.steps_covered(job.search) if rnd.budget else 0)
    path = rd / "teacher_cache"
    cj = shared_cache.cache_job(job, path, teacher, n)
    steps.run(f"round {i}: teacher cache", tc.complete(path, n), lambda: tc.build(cj))
    return dataclasses.replace(job, kd=dataclasses.replace(job.kd, teacher_cache=str(path)))


def prune_round(job, i: int, rd: Path, rnd: RoundConfig, teacher: Path, steps: Steps):
    """The round's pruned student: searched at the round's budget, or pruned to its target.
    Returns (its checkpoint, the search's chosen.json as on disk or None)."""
    from .pruning.run import prune
    from .search.run import run_search

    if rnd.budget is None:
        pruned = rd / "pruned"
        pj = PruneJob(model=with_checkpoint(job.model, teacher), parallel=job.parallel,
                      data=job.data, prune=dataclasses.replace(job.prune, target=rnd.target),
                      output=str(pruned))
        steps.run(f"round {i}: prune", complete(pruned), lambda: prune(pj))
        return pruned, None
    sj = SearchJob(model=with_checkpoint(job.model, teacher), parallel=job.parallel,
                   data=job.data, prune=job.prune, train=job.train, kd=job.kd,
                   eval=job.eval, cache=job.cache,
                   search=dataclasses.replace(job.search, budget=rnd.budget, only=None,
                                              plan_only=False),
                   output=str(rd / "search"))
    steps.run(f"round {i}: search", (rd / "search" / CHOSEN).is_file(), lambda: run_search(sj))
    chosen = read_chosen(rd / "search")
    # the winner, already pruned by the search; recorded in summary.json as it is on disk
    return Path(chosen.pruned), chosen.to_dict()


def write_pipeline_report(out: Path, summary: dict) -> None:
    """report.md, and each round's retained accuracy in the log (rank 0)."""
    from .report.pipeline import write_report
    from .runtime import dist

    if not dist.is_rank0():
        return
    write_report(out, summary)
    for r in summary["rounds"]:
        v = r["val_loss"]
        log.info("%s: held-out loss teacher %.3f -> pruned %.3f -> distilled %.3f (%d -> %d M "
                 "parameters)", r["name"], v["teacher"], v["pruned"], v["distilled"],
                 round(r["params"]["teacher"] / 1e6), round(r["params"]["student"] / 1e6))
        m = mean_retained(r["task_table"], "distilled")
        if m is not None:
            a = mean_retained(r.get("task_table_acc") or [], "distilled")
            e = mean_retained_stderr(r["task_table"], "distilled")
            log.info("%s: distilled student keeps %.2f%s of the teacher's above-chance accuracy "
                     "(acc_norm, mean over %s%s)", r["name"], m,
                     "" if e is None else f" ± {e:.2f}",
                     ", ".join(t["task"] for t in r["task_table"]),
                     "" if a is None else f"; {a:.2f} on plain acc")
    log.info("pipeline done in %.0f s; report: %s", summary["seconds"], out / "report.md")

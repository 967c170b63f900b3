"""`minitron search`: rank candidate architectures by a short distillation of each.

One calibration gives the importance scores every candidate is pruned from. Each selected
candidate is pruned, evaluated (loss before retraining), distilled for ``search.steps`` and
evaluated again; candidates are ranked by that validation loss (or a task's accuracy). With
``search.confirm_top`` the best few are also distilled for ``search.confirm_steps``, and the table
shows whether the short ranking held. Everything lands under ``output/``::

    importance.safetensors  candidates.json  search.md  search.png  chosen.json  teacher_cache/
    cand_<i>/pruned  cand_<i>/distill  cand_<i>/eval_pruned.json  cand_<i>/eval.json
    cand_<i>/confirm  cand_<i>/eval_confirm.json

Steps already complete are skipped, so a search resumes, and ``search.only=[i, ...]`` runs a
subset: a Hydra multirun (``-m 'search.only=[0],[1],[2]'``) spreads candidates over cluster jobs, and a
last plain run ranks them.

A candidate whose distillation diverges (the numerical guard stops it) is recorded as such in
``cand_<i>/distill/diverged.json`` and left out of the ranking, so one unstable architecture does
not cost the whole search; only when every candidate diverged does the search stop. A rerun with
the same train settings would diverge the same way and skips it; other settings retry it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from ..artifacts.evaluation import read_eval
from ..artifacts.search_files import (DIVERGED, Chosen, Diverged, read_diverged, write_candidates,
                                      write_chosen, write_diverged)
from ..config.schema import DistillJob, PruneJob
from ..convert import checkpoint as ckpt
from ..distill.guard import TrainingDiverged
from ..importance.reduce import SCORES_FILE
from ..runs import Steps, complete, on_rank0, with_checkpoint
from . import shared_cache
from .rank import kendall_tau, rank_results
from .report import write_search_report
from .space import counted, describe_empty, enumerate_candidates, select

log = logging.getLogger(__name__)


def plan_candidates(job):
    """(all candidates in the band, the ones to train); raises before any heavy work."""
    s = job.search
    src = ckpt.Checkpoint(job.model.checkpoint)
    src.arch.check_parallel(job.parallel.tp, job.parallel.pp, job.parallel.ep)
    found = enumerate_candidates(src.arch, s, job.parallel.tp, job.parallel.pp, job.parallel.ep)
    if not found:
        raise ValueError(f"search.budget={s.budget:g}: "
                         + describe_empty(src.arch, s, job.parallel.tp, job.parallel.pp))
    chosen = select(found, s.max_candidates)
    # number the selected candidates 0..k-1 (their directories, search.only), the rest after
    picked = {c.index for c in chosen}
    order = chosen + [c for c in found if c.index not in picked]
    found = [dataclasses.replace(c, index=i) for i, c in enumerate(order)]
    chosen = found[:len(chosen)]
    if s.only is not None:
        known = {c.index for c in chosen}
        bad = sorted(set(s.only) - known)
        if bad:
            raise ValueError(f"search.only={list(s.only)}: {bad} are not selected candidates; the "
                             f"selected ones are {sorted(known)} (see candidates.json, or run with "
                             "search.plan_only=true)")
    return src, found, chosen


def run_search(job) -> dict:
    """The `minitron search` command: plan, calibrate once, prune/evaluate/distill/evaluate each
    selected candidate, then rank, confirm and choose (each step skipped when already done)."""
    from ..runtime import dist

    s = job.search
    src, found, chosen = plan_candidates(job)
    out = Path(job.output)
    budget = write_plan(job, out, src, found, chosen)
    if s.plan_only:
        return {"candidates": [c.to_dict() for c in found],
                "selected": sorted(c.index for c in chosen)}

    steps = Steps()
    scores = calibrate_once(job, out, steps)
    job = shared_cache.build(job, steps)  # kd.teacher_cache: the candidates' shared teacher
    for c in chosen:
        if s.only is None or c.index in s.only:
            train_candidate(job, c, out, scores, steps)

    results = collect(out, chosen, s.rank_by)
    pending = [r["index"] for r in results if r.get("val_loss") is None and "diverged" not in r]
    if pending:
        summary = {**budget, "results": results, "pending": pending}
        if dist.is_rank0():
            write_search_report(out, summary)
            log.info("search: candidates %s not done yet; run again (without search.only) to rank "
                     "them all", pending)
        return summary
    check_diverged(out, budget, results)
    if s.confirm_top:
        confirm_best(job, out, results, steps)
        results = collect(out, chosen, s.rank_by)
    summary = {**budget, "results": results, "pending": [], "stage_seconds": steps.seconds,
               **agreement(results)}
    summary["chosen"] = choose(job, out, results, summary).to_dict()
    return summary


def write_plan(job, out: Path, src, found, chosen) -> dict:
    """candidates.json (every candidate in the band, the selected ones marked); returns the
    budget fields every summary starts with."""
    from ..runtime import dist

    s = job.search
    if dist.is_rank0():
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    budget = {"budget": s.budget, "count_embeddings": s.count_embeddings, "count": s.count,
              "source_params": counted(src.arch, s),
              "tolerance": s.tolerance}
    selected = {c.index for c in chosen}
    on_rank0(lambda: write_candidates(out, {
        "source": str(src.path), **budget,
        "candidates": [{**c.to_dict(), "selected": c.index in selected} for c in found]}))
    if dist.is_rank0():
        log.info("search: %d architectures within %.0f%% of the budget; training %d: %s",
                 len(found), 100 * s.tolerance, len(chosen), ", ".join(c.name() for c in chosen))
    return budget


def calibrate_once(job, out: Path, steps: Steps) -> Path:
    """The importance scores every candidate is pruned from: prune.scores, or one calibration
    saved as importance.safetensors."""
    from ..pruning.run import calibrate_to

    scores = Path(job.prune.scores) if job.prune.scores else out / SCORES_FILE
    calib = PruneJob(model=job.model, parallel=job.parallel, data=job.data, prune=job.prune,
                     output=str(out / "unused"))
    steps.run("calibrate", scores.is_file(), lambda: calibrate_to(calib, scores))
    return scores


def train_candidate(job, c, out: Path, scores: Path, steps: Steps) -> None:
    """Prune candidate ``c`` from the shared scores, evaluate it, distill it for search.steps and
    evaluate the result (unless it diverged)."""
    from ..pruning.run import prune

    s = job.search
    cd = out / f"cand_{c.index}"
    pj = PruneJob(model=job.model, parallel=job.parallel, data=job.data,
                  prune=dataclasses.replace(job.prune, target=c.target, scores=str(scores)),
                  output=str(cd / "pruned"))
    steps.run(f"candidate {c.index} {c.name()}: prune", complete(cd / "pruned"),
              lambda: prune(pj))
    steps.evaluate(f"candidate {c.index}: evaluate pruned", cd / "pruned", cd / "eval_pruned.json",
                   job, dataclasses.replace(job.eval, tasks=[]))
    if distill_candidate(job, steps, cd / "pruned", cd / "distill", s.steps,
                         f"candidate {c.index}: distill {s.steps} steps"):
        steps.evaluate(f"candidate {c.index}: evaluate distilled", cd / "distill" / "final",
                       cd / "eval.json", job)


def distill_candidate(job, steps: Steps, pruned: Path, run_dir: Path, train_steps: int,
                      label: str) -> bool:
    """True when ``run_dir/final`` holds the distilled candidate, False when it diverged (now,
    or in an earlier run with the same train settings)."""
    from ..distill.trainer import train
    from ..runtime import dist

    dj = DistillJob(model=with_checkpoint(job.model, pruned), parallel=job.parallel,
                    data=job.data, train=dataclasses.replace(job.train, steps=train_steps),
                    kd=dataclasses.replace(job.kd, teacher=str(job.model.checkpoint)),
                    output=str(run_dir))
    settings = json.loads(json.dumps(dataclasses.asdict(dj.train), default=str))
    marker = run_dir / DIVERGED
    if marker.is_file():
        if read_diverged(run_dir).train == settings:
            if dist.is_rank0():
                log.info("[%s] diverged in an earlier run with these train settings, skipped",
                         label)
            return False
        dist.barrier()  # every rank has read it before rank 0 removes it
        if dist.is_rank0():  # other settings (a lower train.lr ...): try again
            marker.unlink()
    def distill():
        shared_cache.check_before_distill(dj, pruned)
        return train(dj, "search")

    try:
        steps.run(label, complete(run_dir / "final"), distill)
    except TrainingDiverged as e:  # raised alike on every rank
        if dist.is_rank0():
            run_dir.mkdir(parents=True, exist_ok=True)
            log.warning("[%s] diverged; this candidate is left out of the ranking: %s", label, e)
        record = Diverged(str(e), settings)
        on_rank0(lambda: write_diverged(run_dir, record))
        return False
    return True


def check_diverged(out: Path, budget: dict, results: list[dict]) -> None:
    """Stop (with the table written) when every candidate diverged; warn when some did."""
    from ..runtime import dist

    diverged = [r for r in results if "diverged" in r]
    if len(diverged) == len(results):
        summary = {**budget, "results": results, "pending": []}
        if dist.is_rank0():
            write_search_report(out, summary)
        raise TrainingDiverged(
            f"the short distillation of every search candidate diverged ({len(results)}: "
            f"{', '.join(str(r['index']) for r in results)}), so none can be chosen; candidate "
            f"{diverged[0]['index']}: {diverged[0]['diverged']}")
    if diverged and dist.is_rank0():
        log.warning("search: candidate(s) %s diverged in their distillation (non-finite) and are "
                    "not ranked; see %s", [r["index"] for r in diverged], out / "search.md")


def confirm_best(job, out: Path, results: list[dict], steps: Steps) -> None:
    """Distill the search.confirm_top best-ranked candidates for search.confirm_steps."""
    s = job.search
    for r in [r for r in results if r.get("rank")][: s.confirm_top]:
        cd = out / f"cand_{r['index']}"
        if distill_candidate(job, steps, cd / "pruned", cd / "confirm", s.confirm_steps,
                             f"candidate {r['index']}: confirm {s.confirm_steps} steps"):
            steps.evaluate(f"candidate {r['index']}: evaluate confirmed",
                           cd / "confirm" / "final", cd / "eval_confirm.json", job)


def choose(job, out: Path, results: list[dict], summary: dict) -> Chosen:
    """The winner (the best confirmed candidate when there was a confirmation), written to
    chosen.json with the search report."""
    from ..runtime import dist

    best = results[0]
    if any("confirm_rank" in r for r in results):
        best = min((r for r in results if "confirm_rank" in r), key=lambda r: r["confirm_rank"])
    cd = out / f"cand_{best['index']}"
    chosen = Chosen(
        index=best["index"], name=best["name"], target=best["target"], params=best["params"],
        pruned=str(cd / "pruned"),
        distilled=str(cd / ("confirm" if "confirm_rank" in best else "distill") / "final"),
        plan=str(cd / "pruned" / "plan.json"), rank_by=job.search.rank_by)
    on_rank0(lambda: write_chosen(out, chosen))
    if dist.is_rank0():
        write_search_report(out, {**summary, "chosen": chosen.to_dict()})
        log.info("search: chosen candidate %d %s (%.1fM parameters); table: %s", best["index"],
                 best["name"], best["params"] / 1e6, out / "search.md")
    return chosen


def collect(out: Path, chosen, rank_by: str) -> list[dict]:
    """Per candidate: its results so far, ranked (best first; pending ones last)."""
    rows = []
    for c in chosen:
        cd = out / f"cand_{c.index}"
        row = c.to_dict()
        for key, name in (("pruned_loss", "eval_pruned.json"), ("val_loss", "eval.json"),
                          ("confirm_loss", "eval_confirm.json")):
            if (cd / name).is_file():
                res = read_eval(cd / name)
                row[key] = res.loss
                tasks = res.task_scores()
                if tasks:
                    row[key.replace("loss", "tasks")] = tasks
        for key, run in (("diverged", "distill"), ("confirm_diverged", "confirm")):
            if (cd / run / DIVERGED).is_file():
                row[key] = read_diverged(cd / run).message
        rows.append(row)
    return rank_results(rows, rank_by)


def agreement(results: list[dict]) -> dict:
    """Kendall's tau between rankings: before vs after the short distillation, and short vs
    confirmation (on the confirmed candidates)."""
    out = {}
    done = [r for r in results if r.get("pruned_loss") is not None and r.get("val_loss") is not None]
    if len(done) >= 2:
        out["tau_pruned_vs_short"] = kendall_tau([r["pruned_loss"] for r in done],
                                                 [r["val_loss"] for r in done])
    conf = [r for r in results if r.get("confirm_loss") is not None]
    if len(conf) >= 2:
        out["tau_short_vs_confirm"] = kendall_tau([r["val_loss"] for r in conf],
                                                  [r["confirm_loss"] for r in conf])
    return out

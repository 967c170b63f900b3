"""The whole recipe in one job: teacher correction -> prune -> distill -> evaluate -> export,
round after round (each round's distilled student is the next round's teacher).

Every stage writes its output under the run directory atomically; a stage whose output is
complete is skipped, so an interrupted pipeline resumes where it stopped (and distillation
resumes from its latest checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from .config.schema import (DistillJob, FinetuneJob, ModelConfig, PruneJob, RoundConfig)
from .convert import checkpoint as ckpt

log = logging.getLogger(__name__)


def _complete(path: Path) -> bool:
    return (path / ckpt.META).is_file()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def run_pipeline(job) -> dict:
    from .distill.loop import train
    from .evaluate.run import evaluate_checkpoint
    from .pruning.run import prune
    from .runtime import dist

    out = Path(job.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings: dict[str, float] = {}

    def stage(name: str, done: bool, fn):
        if done:
            if dist.is_rank0():
                log.info("[%s] complete, skipped", name)
            return
        t = time.time()
        if dist.is_rank0():
            log.info("[%s] running", name)
        fn()
        timings[name] = round(time.time() - t, 1)

    def model(checkpoint) -> ModelConfig:
        return dataclasses.replace(job.model, checkpoint=str(checkpoint))

    def evaluate(name: str, checkpoint, path: Path) -> dict:
        stage(f"evaluate {name}", path.is_file(), lambda: _write_json(path, evaluate_checkpoint(
            str(checkpoint), job.parallel, job.data, job.eval, job.model.dtype)))
        return json.loads(path.read_text())

    teacher = Path(job.model.checkpoint)
    if job.pipeline.teacher_correction_steps:
        corrected = out / "teacher_correction"
        ft = FinetuneJob(model=model(teacher), parallel=job.parallel, data=job.data,
                         train=dataclasses.replace(job.train,
                                                   steps=job.pipeline.teacher_correction_steps),
                         output=str(corrected))
        stage("teacher correction", _complete(corrected / "final"),
              lambda: train(ft, None, dict(logit_weight=0.0, lm_weight=1.0), "finetune"))
        teacher = corrected / "final"

    rounds = job.pipeline.rounds or [RoundConfig(target=job.prune.target)]
    summary = {"rounds": [], "teacher": str(job.model.checkpoint)}
    for i, rnd in enumerate(rounds, 1):
        rd = out / (rnd.name or f"round{i}")
        pruned, distilled = rd / "pruned", rd / "distill"
        pj = PruneJob(model=model(teacher), parallel=job.parallel, data=job.data,
                      prune=dataclasses.replace(job.prune, target=rnd.target), output=str(pruned))
        stage(f"round {i}: prune", _complete(pruned), lambda: prune(pj))
        dj = DistillJob(model=model(pruned), parallel=job.parallel, data=job.data, train=job.train,
                        kd=dataclasses.replace(job.kd, teacher=str(teacher)), output=str(distilled))
        kd = job.kd
        stage(f"round {i}: distill", _complete(distilled / "final"), lambda: train(
            dj, str(teacher), dict(logit_weight=kd.logit_weight, lm_weight=kd.lm_weight,
                                   temperature=kd.temperature, kind=kd.kind, top_k=kd.top_k,
                                   chunk_tokens=kd.chunk_tokens), "distill"))
        student = distilled / "final"
        evals = {name: evaluate(name, ck, rd / f"eval_{name}.json")
                 for name, ck in (("teacher", teacher), ("pruned", pruned), ("distilled", student))}
        if job.pipeline.export:
            from .convert.hf import export_hf

            hf = rd / "hf"
            stage(f"round {i}: export", (hf / "config.json").is_file(),
                  lambda: export_hf(str(student), hf) if dist.is_rank0() else None)
        summary["rounds"].append({
            "name": rd.name, "teacher": str(teacher), "student": str(student),
            "params": {"teacher": ckpt.Checkpoint(teacher).arch.num_params(),
                       "student": ckpt.Checkpoint(student).arch.num_params()},
            "arch": ckpt.Checkpoint(student).arch.to_dict(),
            "val_loss": {k: v["loss"] for k, v in evals.items()},
            "tasks": {k: {t: r["acc_norm"] for t, r in v["tasks"]["results"].items()}
                      for k, v in evals.items() if "tasks" in v}})
        teacher = student
    summary.update(seconds=round(time.time() - t0, 1), stage_seconds=timings)
    if dist.is_rank0():
        _write_json(out / "summary.json", summary)
        from .report.pipeline import write_report

        write_report(out, summary)
        log.info("pipeline done in %.0f s; report: %s", summary["seconds"], out / "report.md")
    return summary

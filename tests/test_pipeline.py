"""`minitron pipeline` on tiny models: two chained rounds, report, and resume after an
interruption between stages (completed stages are skipped, results unchanged)."""

import dataclasses
import json
import logging

import pytest
import torch

from nemo_minitron.config.schema import (PipelineConfig, PipelineJob, Targets,
                                         RoundConfig)
from nemo_minitron.convert import checkpoint as ckpt

from tests.helpers import metrics, tiny_workspace
from tests.helpers.jobs import tiny_job_parts


def make_job(tmp):
    return PipelineJob(
        **tiny_job_parts(tmp, steps=4, log_interval=2, save_interval=2),
        pipeline=PipelineConfig(rounds=[
            RoundConfig(target=Targets(hidden_size=96, ffn_hidden_size=192)),
            RoundConfig(target=Targets(ffn_hidden_size=128, num_layers=3))]),
        output=str(tmp / "run"))


@pytest.fixture()
def setup(tmp_path):
    return tiny_workspace(tmp_path)


def test_two_rounds_resume_after_interruption(setup, single_rank, monkeypatch, caplog):
    from nemo_minitron import pipeline
    from nemo_minitron.distill import trainer

    job = make_job(setup)
    real_train, calls = trainer.train, []

    def failing_train(j, *a, **k):  # the second round's distillation dies mid-pipeline
        calls.append(j.output)
        if "round2" in j.output:
            raise RuntimeError("node lost")
        return real_train(j, *a, **k)

    monkeypatch.setattr(trainer, "train", failing_train)
    with pytest.raises(RuntimeError, match="node lost"):
        pipeline.run_pipeline(job)
    run = setup / "run"
    assert (run / "round1" / "hf" / "config.json").is_file()
    assert (run / "round2" / "pruned" / "plan.json").is_file()
    r1 = {k: ckpt.Checkpoint(run / "round1" / "distill" / "final").get(k)
          for k in ckpt.Checkpoint(run / "round1" / "distill" / "final").keys()}

    monkeypatch.setattr(trainer, "train", real_train)
    caplog.set_level(logging.INFO, logger="nemo_minitron.pipeline")
    summary = pipeline.run_pipeline(job)
    assert [k for k in summary["stage_seconds"] if k.startswith("round 1")] == []  # all skipped
    assert "round 2: distill" in summary["stage_seconds"]
    final1 = ckpt.Checkpoint(run / "round1" / "distill" / "final")
    assert all(torch.equal(final1.get(k), v) for k, v in r1.items())

    r1s, r2s = summary["rounds"]
    assert r2s["teacher"] == r1s["student"]  # chained: round 1's student teaches round 2
    assert r1s["arch"]["hidden_size"] == 96 and r2s["arch"]["num_layers"] == 3
    assert r2s["params"]["student"] < r1s["params"]["student"] < r1s["params"]["teacher"]
    for r in summary["rounds"]:  # (loss falling under KD is tested in test_distill_run)
        rows = metrics(run / r["name"] / "distill")
        assert len([x["kd"] for x in rows if "kd" in x]) == 4
        assert set(r["val_loss"]) == {"teacher", "pruned", "distilled"}
        p, d = ckpt.Checkpoint(run / r["name"] / "pruned"), ckpt.Checkpoint(r["student"])
        assert any(not torch.equal(p.get(k), d.get(k)) for k in p.keys())
    report = (run / "report.md").read_text()
    assert "round2" in report and "distilled" in report and (run / "round1" / "training.png").is_file()
    assert json.loads((run / "summary.json").read_text())["rounds"][1]["name"] == "round2"
    v = r2s["val_loss"]  # the log ends with each round's losses, as the report gives them
    assert (f"round2: held-out loss teacher {v['teacher']:.3f} -> pruned {v['pruned']:.3f} -> "
            f"distilled {v['distilled']:.3f}") in caplog.text

    # relaunched with other settings: what only logs may change; another recipe stops before any
    # step runs; other evaluation settings evaluate again (and nothing else)
    monkeypatch.setattr(trainer, "train", failing_train)  # any training now would fail the test
    calls.clear()
    logged = dataclasses.replace(job, train=dataclasses.replace(job.train, log_interval=1))
    assert pipeline.run_pipeline(logged)["stage_seconds"] == {}
    longer = dataclasses.replace(job, train=dataclasses.replace(job.train, steps=6))
    with pytest.raises(ValueError, match=r"train\.steps=4 \(now 6\).*new output="):
        pipeline.run_pipeline(longer)
    fewer = dataclasses.replace(job, eval=dataclasses.replace(job.eval, num_batches=1))
    again = pipeline.run_pipeline(fewer)["stage_seconds"]
    assert sorted(again) == sorted(f"round {i}: evaluate {m}" for i in (1, 2)
                                   for m in ("teacher", "pruned", "distilled"))
    assert calls == []
    asked = json.loads((run / "round1" / "eval_distilled.json").read_text())["asked"]
    assert asked["num_batches"] == 1
    assert pipeline.run_pipeline(fewer)["stage_seconds"] == {}

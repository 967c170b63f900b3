"""recipe.json: a pipeline relaunch resumes the same recipe or stops with one line."""

import dataclasses
import logging

import pytest

from nemo_minitron import recipe_record
from nemo_minitron.config.schema import DataConfig, ModelConfig, PipelineJob, Targets
from nemo_minitron.convert.checkpoint import META


def job(tmp_path, target=None, **train):
    j = PipelineJob(model=ModelConfig(checkpoint="/ck"), data=DataConfig(prefix="/data"),
                    output=str(tmp_path / "run"))
    if target:
        j = dataclasses.replace(j, prune=dataclasses.replace(j.prune, target=target))
    return dataclasses.replace(j, train=dataclasses.replace(j.train, **train)) if train else j


def complete(out, step):
    (out / "round1" / step).mkdir(parents=True, exist_ok=True)
    (out / "round1" / step / META).write_text("{}")


def test_recipe_keeps_what_decides_outputs(tmp_path):
    r = recipe_record.recipe(job(tmp_path))
    assert {"train.steps", "train.lr", "prune.target.hidden_size", "kd.temperature",
            "data.prefix", "model.checkpoint", "parallel.seed"} <= set(r)
    assert not {k for k in r if k.startswith(("eval.", "parallel.tp", "train.log_interval",
                                               "train.micro_batch_size", "model.dtype"))}


def test_relaunch_checks(tmp_path, caplog):
    out = tmp_path / "run"
    (out / recipe_record.LOG_DIR / "2026-12-02_05-45-56").mkdir(parents=True)  # the stage's log, made first
    caplog.set_level(logging.WARNING, logger="nemo_minitron.recipe_record")
    recipe_record.check(job(tmp_path), out)  # first invocation: records
    assert "without recipe.json" not in caplog.text  # a fresh run is not an old one
    assert (out / recipe_record.RECORD).is_file()
    complete(out, "pruned")
    recipe_record.check(job(tmp_path), out)
    recipe_record.check(job(tmp_path, log_interval=1, micro_batch_size=1), out)  # free to change
    with pytest.raises(ValueError, match=r"prune\.target\.hidden_size=null \(now 64\);"
                                         r".*new output="):
        recipe_record.check(job(tmp_path, Targets(hidden_size=64)), out)
    # the distillation is not complete (diverged, say): a lower lr resumes it, and is recorded
    recipe_record.check(job(tmp_path, lr=5e-5), out)
    complete(out, "distill/final")
    recipe_record.check(job(tmp_path, lr=5e-5), out)
    with pytest.raises(ValueError, match=r"train\.lr=5e-05 \(now 0\.001\), train\.steps=100 "
                                         r"\(now 70\);.*new output="):
        recipe_record.check(job(tmp_path, steps=70, lr=1e-3), out)

    (out / recipe_record.RECORD).write_text("{not json")
    with pytest.raises(ValueError, match=r"recipe\.json: unreadable .*remove it"):
        recipe_record.check(job(tmp_path), out)

    (out / recipe_record.RECORD).unlink()  # a run made before the record existed
    recipe_record.check(job(tmp_path, steps=70), out)
    assert "without recipe.json" in caplog.text
    with pytest.raises(ValueError, match=r"train\.steps=70 \(now 100\)"):
        recipe_record.check(job(tmp_path), out)

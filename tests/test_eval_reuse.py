"""An identical evaluation is reused instead of run again (``eval.reuse``), and anything that
changes its numbers (checkpoint files, settings, dtype, code) runs it afresh.

The checkpoint and corpus are written by the project's writers (``tiny_workspace``); the cache
lives in this test's own ``NEMO_MINITRON_CACHE``. "Not run again" is shown by the model loader
raising if it is called."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from nemo_minitron.config.schema import ParallelConfig
from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.evaluate import reuse
from nemo_minitron.evaluate import run as erun

from tests.helpers import torchrun
from tests.helpers.corpus import tiny_corpus, tiny_workspace
from tests.helpers.jobs import tiny_job_parts
from tests.test_multiple_choice import write_jsonl_task


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMO_MINITRON_CACHE", str(tmp_path / "cache"))
    tiny_workspace(tmp_path)
    parts = tiny_job_parts(tmp_path)
    task = write_jsonl_task(tmp_path / "task.jsonl")
    ev = dataclasses.replace(parts["eval"], tasks=[f"jsonl:{task}"])
    tiny_corpus(tmp_path / "corpus.v2", n_docs=50)  # a dot in the prefix, as versioned corpora have
    data = dataclasses.replace(parts["data"], prefix=str(tmp_path / "corpus.v2"))
    return tmp_path, data, ev


def evaluate(root, data, ev, dtype="fp32", checkpoint=None, seed=1234):
    return erun.evaluate_checkpoint(str(checkpoint or root / "teacher"), ParallelConfig(seed=seed),
                                    data, ev, dtype)


@pytest.fixture
def no_model(monkeypatch):
    """Make loading a model fail: an evaluation that is reused never loads one."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded: the evaluation ran again")

    return lambda: monkeypatch.setattr(erun, "load_checkpoint", refuse)


def test_identical_evaluation_is_reused(ws, no_model, caplog):
    root, data, ev = ws
    first = evaluate(root, data, ev)
    (entry,) = reuse.store_dir().glob("*.json")
    no_model()
    with caplog.at_level(logging.INFO, logger="nemo_minitron.evaluate.run"):
        again = evaluate(root, data, ev)
    assert again == json.loads(json.dumps(first, default=str))  # the same numbers, every field
    assert f"reusing the results of an identical evaluation of {root / 'teacher'}: {entry}" \
        in caplog.text


@pytest.mark.parametrize("change", ["limit", "num_batches", "dtype", "task_file", "resaved",
                                    "code", "seed", "corpus_rebuilt", "reuse_off"])
def test_a_change_evaluates_again(ws, monkeypatch, change):
    root, data, ev = ws
    first = evaluate(root, data, ev)
    dtype, checkpoint, seed = "fp32", None, 1234
    if change == "limit":
        ev = dataclasses.replace(ev, limit=5)
    elif change == "num_batches":
        ev = dataclasses.replace(ev, num_batches=1)
    elif change == "dtype":
        dtype = "bf16"
    elif change == "task_file":  # the same path, other items
        write_jsonl_task(Path(ev.tasks[0][6:]), seed=1)
    elif change == "resaved":  # the same weights written again: a new checkpoint
        c = ckpt.Checkpoint(root / "teacher")
        checkpoint = ckpt.save(root / "copy", c.arch, c.tensors(), tokenizer=c.tokenizer())
    elif change == "code":
        monkeypatch.setattr(reuse, "code_digest", lambda: "another version")
    elif change == "seed":  # other held-out documents
        seed = 7
    elif change == "corpus_rebuilt":  # the same prefix, other documents
        for suffix in (".bin", ".idx", ".json"):
            Path(data.prefix + suffix).unlink()
        tiny_corpus(data.prefix, n_docs=50, seed=3)
    elif change == "reuse_off":
        ev = dataclasses.replace(ev, reuse=False)
    calls = []
    load = erun.load_checkpoint
    monkeypatch.setattr(erun, "load_checkpoint", lambda *a, **k: calls.append(1) or load(*a, **k))
    again = evaluate(root, data, ev, dtype, checkpoint, seed)
    assert calls == [1]
    if change == "limit":
        assert next(iter(again["tasks"]["results"].values()))["n"] == 5
    if change == "num_batches":
        assert again["tokens"] == first["tokens"] // 2
    stored = len(list(reuse.store_dir().glob("*.json")))
    assert stored == (1 if change == "reuse_off" else 2)


def test_damaged_cache_entry_is_ignored_and_replaced(ws, no_model, caplog):
    root, data, ev = ws
    first = evaluate(root, data, ev)
    (entry,) = reuse.store_dir().glob("*.json")
    entry.write_text('{"format": "nemo_minitron.eval_results/1", "key": "x", "res')
    with caplog.at_level(logging.WARNING, logger="nemo_minitron.evaluate.reuse"):
        again = evaluate(root, data, ev)
    assert "ignoring the unreadable cached evaluation" in caplog.text and str(entry) in caplog.text
    assert again["loss"] == first["loss"]
    no_model()  # the damaged entry was replaced by a whole one
    assert evaluate(root, data, ev)["loss"] == first["loss"]
    assert json.loads(entry.read_text())["result"]["loss"] == first["loss"]


def test_only_the_newest_results_are_kept(ws, monkeypatch):
    root, data, ev = ws
    monkeypatch.setattr(reuse, "KEEP", 2)
    for n in (1, 2, 3):
        evaluate(root, data, dataclasses.replace(ev, limit=n))
    kept = [json.loads(p.read_text())["result"] for p in reuse.store_dir().glob("*.json")]
    assert sorted(next(iter(r["tasks"]["results"].values()))["n"] for r in kept) == [2, 3]


@pytest.mark.multirank
def test_ranks_agree_on_reuse(tmp_path):
    """Rank 0 decides and tells the others: at DP=2 the second evaluation loads no model on
    any rank (the worker's loader raises), and every rank returns rank 0's results."""
    tiny_workspace(tmp_path)
    task = write_jsonl_task(tmp_path / "task.jsonl")
    rows = torchrun("eval_reuse", 2, tmp_path, task)
    assert [r["rank"] for r in rows] == [0, 1]
    for r in rows:
        assert r["second"]["loss"] == rows[0]["first"]["loss"]
        assert r["second"]["acc"] == rows[0]["first"]["acc"]
    assert rows[0]["stored"] == 1

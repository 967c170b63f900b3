"""`minitron search` end to end on a tiny model: one calibration, every candidate pruned to its
target and briefly distilled, ranked, confirmed; resume and candidate subsets; a pipeline round
given a budget instead of targets."""

import dataclasses
import json

import pytest
import torch

from nemo_minitron.config.schema import (KDConfig, PipelineConfig, PipelineJob,
                                         Targets, RoundConfig, SearchConfig, SearchJob,
                                         TrainConfig)
from nemo_minitron import preflight
from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.distill import teacher_cache as tc

from tests.helpers import metrics, minitron, tiny_workspace
from tests.helpers.jobs import tiny_job_parts

SPACE = dict(budget=0.6, tolerance=0.08, layer_step=1, hidden_multiple=32, ffn_multiple=64,
             max_candidates=3, steps=2)


def common(tmp):
    return tiny_job_parts(tmp, steps=99, log_interval=1, save_interval=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("search"))


def test_search_ranks_confirms_and_resumes(tiny, single_rank, monkeypatch):
    from nemo_minitron.distill import trainer
    from nemo_minitron.pruning import run as prune_run
    from nemo_minitron.search.run import run_search

    calls = {"calibrate": 0, "train": []}
    real_cal, real_train = prune_run.calibrate_to, trainer.train

    def count_cal(*a, **k):
        calls["calibrate"] += 1
        return real_cal(*a, **k)

    def count_train(job, *a, **k):
        calls["train"].append((job.output, job.train.steps))
        calls.setdefault("teacher_cache", set()).add(job.kd.teacher_cache)
        return real_train(job, *a, **k)

    monkeypatch.setattr(prune_run, "calibrate_to", count_cal)
    monkeypatch.setattr(trainer, "train", count_train)
    out = tiny / "s1"
    job = SearchJob(**common(tiny), search=SearchConfig(**SPACE, confirm_top=2, confirm_steps=3),
                    output=str(out))
    summary = run_search(job)

    assert calls["calibrate"] == 1  # one set of scores for all candidates
    results = summary["results"]
    assert len(results) == 3 and [r["rank"] for r in results] == [1, 2, 3]
    losses = [r["val_loss"] for r in results]
    assert losses == sorted(losses)
    budget = 0.6 * ckpt.Checkpoint(tiny / "teacher").arch.num_params()
    for r in results:
        pruned = ckpt.Checkpoint(out / f"cand_{r['index']}" / "pruned")
        assert {k: getattr(pruned.arch, k) for k in r["target"]} == r["target"]
        assert pruned.arch.num_params() == r["params"]
        assert abs(r["params"] - budget) <= 0.08 * budget
        # distilled (a random tiny teacher: loss need not fall in 2 steps, weights must change)
        distilled = ckpt.Checkpoint(out / f"cand_{r['index']}" / "distill" / "final")
        assert any(not torch.equal(pruned.get(k), distilled.get(k)) for k in pruned.keys())
        assert r["pruned_loss"] > 0 and r["val_loss"] != r["pruned_loss"]
        # each stage's own short report
        pr = (out / f"cand_{r['index']}" / "pruned" / "report.md").read_text()
        assert f"{r['params'] / 1e6:.2f}M" in pr and "![importance](importance.png)" in pr
        dr = (out / f"cand_{r['index']}" / "distill" / "report.md").read_text()
        assert "Steps: 2, 256 training tokens" in dr and "![training](training.png)" in dr
        assert (out / f"cand_{r['index']}" / "distill" / "training.png").stat().st_size > 1000
        # every candidate was pruned from the same saved scores
        assert json.loads((out / f"cand_{r['index']}" / "pruned" / "plan.json").read_text())
    # short distillations of 2 steps, then the best 2 confirmed with 3, all from one teacher
    # cache (search.teacher_cache=auto) of the 3 steps the longest of them reads
    assert sorted(s for _, s in calls["train"]) == [2, 2, 2, 3, 3]
    cache = out / "teacher_cache"
    assert calls["teacher_cache"] == {str(cache)}
    assert json.loads((cache / "manifest.json").read_text())["steps"] == 3
    assert sorted(f.name for f in cache.glob("step_*")) == [tc.shard_name(i) for i in range(3)]
    assert "teacher cache" in summary["stage_seconds"]
    # a cache of other settings where the search keeps its own is refused in pre-flight
    other = dataclasses.replace(job, data=dataclasses.replace(job.data, seq_length=16))
    with pytest.raises(FileExistsError, match=r"search\.teacher_cache=.*seq_length: 32 vs 16"):
        preflight.check("search", other)
    # an explicit cache directory with settings a cache cannot serve: one line naming both
    rev = dataclasses.replace(job, kd=dataclasses.replace(job.kd, kind="reverse"),
                              search=dataclasses.replace(job.search, teacher_cache=str(cache)))
    with pytest.raises(ValueError, match=r"search\.teacher_cache=.*kd\.kind=reverse"):
        preflight.check("search", rev)
    confirmed = [r for r in results if "confirm_rank" in r]
    assert [r["rank"] for r in confirmed] == [1, 2]
    assert "tau_short_vs_confirm" in summary and "tau_pruned_vs_short" in summary
    chosen = json.loads((out / "chosen.json").read_text())
    best = min(confirmed, key=lambda r: r["confirm_rank"])
    assert chosen["index"] == best["index"] and chosen["distilled"].endswith("confirm/final")
    table = (out / "search.md").read_text()
    assert all(f"`{r['name']}`" in table for r in results) and "Chosen" in table
    assert (out / "search.png").stat().st_size > 1000
    listed = json.loads((out / "candidates.json").read_text())["candidates"]
    assert sum(c["selected"] for c in listed) == 3 and len(listed) >= 3

    # a second run finds everything complete: nothing is calibrated, pruned or trained again
    calls["train"].clear()
    again = run_search(job)
    assert calls["calibrate"] == 1 and calls["train"] == [] and again["stage_seconds"] == {}
    assert [r["index"] for r in again["results"]] == [r["index"] for r in results]


def test_subset_then_rank(tiny, single_rank):
    from nemo_minitron.search.run import run_search

    out = tiny / "s2"
    base = common(tiny)
    first = run_search(SearchJob(**base, search=SearchConfig(**SPACE, only=[0]), output=str(out)))
    assert first["pending"] and 0 not in first["pending"]
    assert not (out / "chosen.json").exists() and "Pending" in (out / "search.md").read_text()
    with pytest.raises(ValueError, match="not selected candidates"):
        run_search(SearchJob(**base, search=SearchConfig(**SPACE, only=[999]), output=str(out)))
    final = run_search(SearchJob(**base, search=SearchConfig(**SPACE), output=str(out)))
    assert final["pending"] == [] and (out / "chosen.json").is_file()
    assert "candidate 0: distill 2 steps" not in final["stage_seconds"]  # done by the first run


def test_pipeline_round_with_a_budget(tiny, single_rank, monkeypatch):
    """A round given a budget searches; with pipeline.teacher_cache=round its teacher runs once,
    into one cache the search candidates and the round's distillation all read."""
    from nemo_minitron.distill import trainer
    from nemo_minitron.pipeline import run_pipeline

    read, real_train = [], trainer.train
    monkeypatch.setattr(trainer, "train", lambda j, *a, **k: (read.append(j.kd.teacher_cache),
                                                              real_train(j, *a, **k))[1])
    base = common(tiny)
    base["train"] = TrainConfig(**{**vars(base["train"]), "steps": 3})
    job = PipelineJob(**base, search=SearchConfig(**{**SPACE, "max_candidates": 2}),
                      pipeline=PipelineConfig(rounds=[RoundConfig(budget=0.6)], export=False,
                                              teacher_cache="round"),
                      output=str(tiny / "pipe"))
    summary = run_pipeline(job)
    cache = tiny / "pipe" / "round1" / "teacher_cache"
    assert read == [str(cache)] * 3  # two candidates and the round's distillation
    assert json.loads((cache / "manifest.json").read_text())["steps"] == 3
    assert not (tiny / "pipe" / "round1" / "search" / "teacher_cache").exists()
    r = summary["rounds"][0]
    chosen = json.loads((tiny / "pipe" / "round1" / "search" / "chosen.json").read_text())
    assert r["search"]["index"] == chosen["index"]
    assert {k: r["arch"][k] for k in chosen["target"]} == chosen["target"]
    assert r["pruned_dir"] == chosen["pruned"]
    assert "search.md" in (tiny / "pipe" / "report.md").read_text()


def test_candidates_get_hidden_pairs_of_their_own_depth(tiny, single_rank, caplog):
    """kd.auto_hidden_pairs=true in a search: each candidate is distilled with the pairs of its
    own plan (candidates of different depths, different pairs), and the hidden loss is trained."""
    import logging

    from nemo_minitron.distill.layer_map import pairs_from_kept
    from nemo_minitron.search.run import run_search

    out = tiny / "s_auto"
    base = common(tiny)
    base["kd"] = KDConfig(chunk_tokens=16, auto_hidden_pairs=True)
    with caplog.at_level(logging.INFO, logger="nemo_minitron.distill.trainer"):
        summary = run_search(SearchJob(**base, search=SearchConfig(**SPACE), output=str(out)))
    logged = [r.getMessage() for r in caplog.records  # the trainer's line per candidate
              if r.name.endswith("distill.trainer") and "auto_hidden_pairs" in r.getMessage()]
    want, depths = [], set()
    for r in sorted(summary["results"], key=lambda r: r["index"]):
        cd = out / f"cand_{r['index']}"
        plan = json.loads((cd / "pruned" / "plan.json").read_text())
        depths.add(len(plan["keep"]["layers"]))
        want.append(str([list(p) for p in pairs_from_kept(plan["keep"]["layers"], 4)]))
        rows = metrics(cd / "distill")
        assert all(x["hidden"] > 0 for x in rows if "loss" in x)
    assert len(depths) >= 2  # the search spreads candidates over depths
    assert not (out / "teacher_cache").exists()  # hidden-state losses: the live teacher (auto)
    assert sorted(m.split("layers ")[1] for m in logged) == sorted(want)


def test_search_config_errors(tiny):
    base = common(tiny)
    with pytest.raises(ValueError, match="search.budget is required"):
        SearchJob(**base, output="x")
    with pytest.raises(ValueError, match="rank_by"):
        SearchJob(**base, search=SearchConfig(budget=0.5, rank_by="piqa"), output="x")
    with pytest.raises(ValueError, match="either target"):
        RoundConfig(budget=0.5, target=Targets(hidden_size=64))


def test_cli_plan_only_multirun(tmp_path):
    """`minitron search -m 'search.only=[0],[1]' search.plan_only=true` on the embedded SmolLM2:
    the same numbered candidates for every sweep job, nothing trained."""

    p = minitron("search", "-m", "search.only=[0],[1]", "search.plan_only=true",
                 f"output={tmp_path}/s", f"hydra.sweep.dir={tmp_path}/sweep")
    assert p.returncode == 0, p.stderr[-2000:]
    listed = json.loads((tmp_path / "s" / "candidates.json").read_text())["candidates"]
    assert [c["index"] for c in listed] == list(range(len(listed)))
    assert [c["selected"] for c in listed[:6]] == [True] * 6 and not listed[6]["selected"]
    assert not (tmp_path / "s" / "importance.safetensors").exists()
    p = minitron("search", "search.budget=0.05", f"output={tmp_path}/s2",
                 f"hydra.run.dir={tmp_path}/h")
    assert p.returncode == 2 and "no candidate architecture within 5%" in p.stderr
    assert not (tmp_path / "s2").exists()  # refused before anything was written


def test_a_diverging_candidate_is_not_ranked_and_the_rest_are(tiny, single_rank, monkeypatch,
                                                             caplog):
    """Candidate 1 trains at lr=1e6 and really diverges (the guard stops it): it is recorded,
    named in search.md and the log, and left out; the others are ranked and one is chosen. A
    rerun with the same settings does not train it again, other settings retry it; when every
    candidate diverges the search stops with one line."""
    import dataclasses
    import logging

    from nemo_minitron.distill import trainer
    from nemo_minitron.distill.guard import TrainingDiverged
    from nemo_minitron.search.run import run_search

    real_train, trained = trainer.train, []

    def unstable(which):
        def train(job, *a, **k):
            trained.append(job.output)
            if which(job.output):
                job = dataclasses.replace(job, train=dataclasses.replace(job.train, lr=1e6))
            return real_train(job, *a, **k)
        return train

    base = common(tiny)
    out = tiny / "s_diverged"
    job = SearchJob(**base, search=SearchConfig(**{**SPACE, "steps": 4}), output=str(out))
    monkeypatch.setattr(trainer, "train", unstable(lambda o: "cand_1" in o))
    with caplog.at_level(logging.WARNING, logger="nemo_minitron.search.run"):
        summary = run_search(job)
    results = {r["index"]: r for r in summary["results"]}
    assert "training diverged at step" in results[1]["diverged"]
    assert "rank" not in results[1] and "val_loss" not in results[1]
    assert sorted(r["rank"] for i, r in results.items() if i != 1) == [1, 2]
    assert summary["chosen"]["index"] != 1 and summary["pending"] == []
    assert [r["index"] for r in summary["results"]][-1] == 1  # unranked rows last
    table = (out / "search.md").read_text()
    assert "| — | 1: `" in table and "| diverged |" in table
    assert "Diverged in the short distillation" in table and "candidates [1]" in table
    assert any("candidate(s) [1] diverged" in r.getMessage() for r in caplog.records)

    trained.clear()  # the same settings would diverge again: nothing is trained
    again = run_search(job)
    assert trained == [] and again["chosen"] == summary["chosen"]
    monkeypatch.setattr(trainer, "train", unstable(lambda o: False))
    retried = run_search(dataclasses.replace(job, train=dataclasses.replace(job.train, lr=5e-4)))
    assert trained == [str(out / "cand_1" / "distill")]  # another lr: tried again, and ranked
    assert "diverged" not in retried["results"][-1] and len(retried["results"]) == 3
    assert all("rank" in r for r in retried["results"])

    monkeypatch.setattr(trainer, "train", unstable(lambda o: True))
    with pytest.raises(TrainingDiverged) as e:
        run_search(dataclasses.replace(job, output=str(tiny / "s_all_diverged")))
    msg = str(e.value)
    assert msg.startswith("the short distillation of every search candidate diverged (3: ")
    assert "\n" not in msg and "training diverged at step" in msg and "train.lr" in msg
    assert not (tiny / "s_all_diverged" / "chosen.json").exists()


def test_cli_every_candidate_diverged_is_one_line(tiny, tmp_path):
    """`minitron search train.lr=1e6`: every candidate diverges; exit status 2, one error line."""

    p = minitron("search", "model.name=tiny", f"model.checkpoint={tiny / 'teacher'}",
                 f"data.prefix={tiny / 'corpus'}", "data.seq_length=32", "data.valid_fraction=0.1",
                 "prune.calib_samples=8", "prune.micro_batch_size=2", "train.global_batch_size=4",
                 "train.micro_batch_size=2", "train.lr=1e6", "train.warmup_steps=1",
                 "train.eval_interval=0", "train.eval_batches=2", "train.save_interval=0",
                 "train.tensorboard=false", "kd.chunk_tokens=16", "eval.micro_batch_size=2",
                 "eval.num_batches=2", "eval.tasks=[]", "search.budget=0.6",
                 "search.tolerance=0.08", "search.layer_step=1", "search.hidden_multiple=32",
                 "search.ffn_multiple=64", "search.max_candidates=2", "search.steps=4",
                 f"output={tmp_path}/s")
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [x for x in p.stderr.splitlines() if "error" in x.lower()]
    assert len(errors) == 1 and errors[0].startswith(
        "minitron search: error: the short distillation of every search candidate diverged (2: "
        "0, 1)"), p.stderr[-3000:]
    assert "training diverged at step" in errors[0] and "train.lr (now 1e+06)" in errors[0]
    assert "| diverged |" in (tmp_path / "s" / "search.md").read_text()

"""The artifact layer: the atomic primitives leave whole outputs or none, and the typed readers
read what the writers write."""

import math
import re

import pytest

from nemo_minitron.arch import Arch
from nemo_minitron.artifacts import atomic
from nemo_minitron.artifacts.checkpoint_meta import new_meta, read_checkpoint_meta
from nemo_minitron.artifacts.evaluation import read_eval, write_eval
from nemo_minitron.artifacts.metrics import append_metrics, read_metrics
from nemo_minitron.artifacts.pipeline_files import read_summary, write_summary
from nemo_minitron.artifacts.search_files import (Chosen, Diverged, read_chosen, read_diverged,
                                                  write_chosen, write_diverged)
from nemo_minitron.convert import checkpoint as ckpt


class Boom(Exception):
    pass


def test_failed_directory_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Boom):
        with atomic.new_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 100)
            raise Boom
    assert list(tmp_path.iterdir()) == []  # no partial output, no temporary directory


def test_failed_directory_keeps_the_old_one(tmp_path):
    out = tmp_path / "out"
    with atomic.new_dir(out) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        with atomic.new_dir(out):
            pass
    with pytest.raises(Boom):
        with atomic.new_dir(out, overwrite=True) as tmp:
            (tmp / "b").write_text("new")
            raise Boom
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["a"]
    with atomic.new_dir(out, overwrite=True) as tmp:  # a complete one replaces it whole
        (tmp / "b").write_text("new")
    assert [p.name for p in out.iterdir()] == ["b"] and not atomic.partials(tmp_path)


def test_failed_file_write_keeps_the_old_file(tmp_path):
    f = tmp_path / "results.json"
    atomic.write_text(f, "old")

    def dies(tmp):
        tmp.write_text("half")
        raise Boom

    with pytest.raises(Boom):
        atomic.write_file(f, dies)
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_checkpoint_meta_round_trip(tmp_path):
    """Provenance is stored flat (as checkpoints always were) and read back by name."""
    arch = Arch(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                num_query_groups=2, head_dim=16, vocab_size=100)
    ckpt.write_meta(tmp_path, arch, {}, {"stage": "distill", "parent": "p", "step": 3})
    raw = atomic.read_json(tmp_path / ckpt.META)
    assert raw["stage"] == "distill" and "provenance" not in raw
    meta = read_checkpoint_meta(tmp_path)
    assert (meta.stage, meta.parent, meta.num_params, meta.provenance["step"]) == \
        ("distill", "p", arch.num_params(), 3)
    assert meta.to_dict() == raw
    assert new_meta(5).stage is None


def test_records_round_trip(tmp_path):
    write_eval(tmp_path / "e.json", {"loss": 2.5, "perplexity": 12.2, "tokens": 10,
                                     "tasks": {"results": {"piqa": {"acc_norm": 0.6}}}})
    ev = read_eval(tmp_path / "e.json")
    assert (ev.loss, ev.tokens, ev.task_scores()) == (2.5, 10, {"piqa": 0.6})
    write_summary(tmp_path, {"seconds": 3, "rounds": [{"name": "r1", "params": {"student": 7}}]})
    s = read_summary(tmp_path)
    assert (s.seconds, s.seconds_all, s.rounds[0].name, s.rounds[0].student_params) == \
        (3.0, None, "r1", 7)
    c = Chosen(1, "c", {"num_layers": 2}, 9, "a", "b", "p", "val_loss")
    write_chosen(tmp_path, c)
    assert read_chosen(tmp_path) == c
    write_diverged(tmp_path, Diverged("nan at step 3", {"lr": 1.0}))
    assert read_diverged(tmp_path).train == {"lr": 1.0}
    with open(tmp_path / "metrics.jsonl", "a") as f:
        append_metrics(f, 1, {"loss": 2.0})
        f.write('{"step": 2, "lo')  # a running job's half-written last line
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0}]


def test_metrics_skip_cut_lines_and_name_wrong_types(tmp_path):
    """A killed run's cut line (also with a resume's line appended to it) and a stray non-object
    are skipped; a row whose step or loss is not a number names its line (it was a TypeError or
    an unnamed float() error in `minitron report`)."""
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo{"step": 2, "loss": 2.4}\n5\n'
                 '{"step": 3, "loss": 2.3, "skipped": false}\n{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(f)] == [1, 3]
    for bad, word in (('{"step": "a", "loss": 1.0}', "step='a'"),
                      ('{"step": 5, "val_loss": "bad"}', "val_loss='bad'"),
                      ('{"step": 5.5, "loss": 1.0}', "step=5.5")):
        f.write_text('{"step": 1, "loss": 2.5}\n' + bad + "\n")
        with pytest.raises(ValueError, match=f"metrics.jsonl:2: {re.escape(word)} is not a number"):
            read_metrics(f)


def test_damaged_results_file_is_named(tmp_path):
    for i, bad in enumerate(({"loss": "abc"}, {"loss": 3.0, "tasks": "oops"},
                             {"tasks": {"results": [1, 2]}},
                             {"tasks": {"results": {"piqa": {"acc_norm": "x"}}}})):
        f = write_eval(tmp_path / f"e{i}.json", bad)
        with pytest.raises(ValueError, match=f"e{i}.json: a damaged results file"):
            read_eval(f)


def test_perplexity_is_never_capped():
    from nemo_minitron.evaluate.loss import perplexity

    assert perplexity(2.0) == math.exp(2.0) and perplexity(700.0) == math.exp(700.0)
    assert perplexity(11029.0) == math.inf

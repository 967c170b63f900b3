"""kd.auto_hidden_pairs: layer pairs read from the student's pruning plan."""

import json

import pytest

from nemo_minitron.config.schema import KDConfig
from nemo_minitron.distill.layer_map import auto_pairs, pairs_from_kept

from tests.helpers import metrics
from tests.test_distill_intermediate import kd_job, kd_models  # noqa: F401


def test_pairs_follow_the_kept_layers():
    # SmolLM2's 30 layers with 3..18 removed: layer 2 must now produce what teacher layer 18 had
    kept = [0, 1, 2] + list(range(19, 30))
    pairs = pairs_from_kept(kept, 30)
    assert pairs[:4] == [(0, 0), (1, 1), (2, 18), (3, 19)] and pairs[-1] == (13, 29)
    assert len(pairs) == 14
    assert pairs_from_kept(list(range(6)), 6) == [(i, i) for i in range(6)]  # width-only plan
    assert pairs_from_kept([1, 4], 6) == [(0, 3), (1, 5)]
    for bad in ([], [3, 1], [0, 6], [2, 2]):
        with pytest.raises(ValueError, match="not increasing layer numbers"):
            pairs_from_kept(bad, 6)


def test_errors_name_the_fix(kd_models, tmp_path):
    t, _, _ = kd_models
    with pytest.raises(ValueError, match="drop kd.hidden_pairs"):
        KDConfig(auto_hidden_pairs=True, hidden_pairs=[[0, 1]])
    with pytest.raises(ValueError, match="hidden_dynamic=false"):
        KDConfig(auto_hidden_pairs=True, logit_weight=0.0)
    with pytest.raises(ValueError, match="was not pruned from the teacher.*explicit kd.hidden_pairs"):
        auto_pairs(t / "pruned", t / "twin", 2, 4)  # pruned from another checkpoint
    with pytest.raises(ValueError, match="no plan.json"):
        auto_pairs(t / "twin", t / "teacher", 4, 4)
    with pytest.raises(ValueError, match="keeps 2 of 4 layers, but the student has 3"):
        auto_pairs(t / "pruned", t / "teacher", 3, 4)
    from nemo_minitron.distill.trainer import train

    kd = KDConfig(teacher=str(t / "twin"), auto_hidden_pairs=True)
    with pytest.raises(ValueError, match="auto_hidden_pairs"):  # before any model is loaded
        train(kd_job(t, "pruned", tmp_path / "never", 1, kd, warmup_steps=0), "distill")
    assert not (tmp_path / "never").exists()


def test_auto_pairs_train_like_the_explicit_list(kd_models, single_rank):
    """A distillation with kd.auto_hidden_pairs=true is step for step the run with the pairs
    written out by hand from plan.json."""
    from nemo_minitron.distill.trainer import train

    t, _, _ = kd_models
    kept = json.loads((t / "pruned" / "plan.json").read_text())["keep"]["layers"]
    explicit = [list(p) for p in pairs_from_kept(kept, 4)]
    assert len(explicit) == 2 and explicit[-1] == [1, 3]
    rows = {}
    for name, kd in (("auto", KDConfig(teacher=str(t / "teacher"), auto_hidden_pairs=True)),
                     ("explicit", KDConfig(teacher=str(t / "teacher"), hidden_pairs=explicit))):
        train(kd_job(t, "pruned", f"pairs_{name}", 3, kd), "distill")
        rows[name] = [r for r in metrics(t / f"pairs_{name}") if "hidden" in r]
    assert len(rows["auto"]) == 3 and rows["auto"][0]["hidden"] > 0
    for a, b in zip(rows["auto"], rows["explicit"]):
        for k in ("loss", "kd", "hidden", "alpha", "grad_norm"):
            assert a[k] == b[k], (a["step"], k)

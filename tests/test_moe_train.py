"""Training and evaluating mixture-of-experts models under expert parallelism: a tiny Mixtral
student distilled from a Mixtral teacher and from a dense Llama teacher (logits plus hidden-state
pairs) follows the same losses, gradient norms, expert load and final weights at parallel.ep=2
as at ep=1 (the same two data-parallel ranks), resumes at ep=2 from its own checkpoint, and
evaluates to the same held-out loss; refusals of what ep does not support come before any model.
(One torchrun launch: tests/workers/moe_train.py.)"""

import re

import pytest
import torch

from nemo_minitron.config.schema import (DataConfig, EvalConfig, EvaluateJob, ModelConfig,
                                         ParallelConfig)
from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.convert import sharded
from nemo_minitron.convert.experts import per_expert
from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.runtime import model as rmodel

from tests.helpers import tiny_corpus, tiny_hf, tiny_tokenizer, torchrun

RTOL = 1e-4


def save_hf(path, hf):
    arch = arch_from_hf_config(hf.config)
    sd = per_expert(hf.state_dict(), arch) if arch.is_moe else hf.state_dict()
    ckpt.save(path, arch, sd, tokenizer=tiny_tokenizer())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe_train")
    save_hf(tmp / "student", tiny_hf("mixtral", seed=1))
    save_hf(tmp / "teacher", tiny_hf("mixtral", seed=0))
    save_hf(tmp / "dense", tiny_hf("gqa"))
    tiny_corpus(tmp / "corpus", n_docs=60)
    return tmp


@pytest.fixture(scope="module")
def rows(root):
    out = torchrun("moe_train", 2, root)
    return {r["run"]: r for r in out if "rank" not in r}, [r for r in out if "rank" in r]


@pytest.mark.multirank
@pytest.mark.parametrize("teacher", ["moe", "dense"])
def test_expert_parallel_training_follows_ep1(rows, root, teacher):
    runs, _ = rows
    one, two = runs[f"{teacher}_ep1"], runs[f"{teacher}_ep2"]
    keys = ("loss", "grad_norm") + (("hidden",) if teacher == "dense" else ())
    for k in keys:
        assert len(one[k]) == 3 and two[k] == pytest.approx(one[k], rel=RTOL), k
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=RTOL)
    # expert load of every step, in the logs: the same routing decisions at both layouts
    assert len(two["moe_max_load"]) == 3
    for k in ("moe_max_load", "moe_min_load", "moe_load_cv"):
        assert two[k] == pytest.approx(one[k], rel=RTOL, abs=1e-6), k
    assert all(hi > 1 > lo >= 0 for hi, lo in zip(two["moe_max_load"], two["moe_min_load"]))
    a, b = ckpt.Checkpoint(root / f"{teacher}_ep1" / "final"), ckpt.Checkpoint(root / f"{teacher}_ep2" / "final")
    assert a.arch == b.arch and set(a.keys()) == set(b.keys())
    start = ckpt.Checkpoint(root / "student")
    for k in a.keys():
        assert torch.allclose(a.get(k), b.get(k), atol=2e-5), k
    assert not torch.equal(a.get(k), start.get(k))  # trained


@pytest.mark.multirank
def test_ep2_layout_is_carved_from_data_parallel(rows):
    """Two ranks at ep=2: two data-parallel replicas of the dense weights, each holding half the
    experts (no expert replica); the training state was written per EP rank."""
    _, ranked = rows
    layout = sorted((r for r in ranked if r["run"] == "layout"), key=lambda r: r["rank"])
    assert [(r["dp"], r["ep"], r["ep_rank"], r["expert_dp"]) for r in layout] == \
        [(2, 2, 0, 1), (2, 2, 1, 1)]


@pytest.mark.multirank
def test_ep2_run_resumes_from_its_checkpoint(rows, root):
    runs, _ = rows
    state = root / "moe_ep2" / "checkpoints" / "step_0000002" / "train_state"
    assert sorted(p.name for p in state.glob("optim-*")) == \
        ["optim-tp0-pp0-ep0.safetensors", "optim-tp0-pp0-ep1.safetensors"]
    again, first = runs["moe_ep2_resumed"], runs["moe_ep2"]
    # steps 1-2 kept, 3 rerun from the sharded step-2 checkpoint (one file per EP rank): bitwise
    step = root / "moe_ep2" / "checkpoints" / "step_0000002"
    assert sharded.is_sharded(step) and (step / "model-tp0-pp0-ep1.safetensors").exists()
    assert again["loss"] == first["loss"] and again["grad_norm"] == first["grad_norm"]
    assert again["val_loss"] == first["val_loss"]


@pytest.mark.multirank
def test_evaluate_at_ep2_matches_ep1(rows):
    _, ranked = rows
    ev = {r["run"]: r for r in ranked if r["run"].startswith("eval") and r["rank"] == 0}
    assert ev["eval_ep2"]["tokens"] == ev["eval_ep1"]["tokens"] > 0
    assert ev["eval_ep2"]["loss"] == pytest.approx(ev["eval_ep1"]["loss"], rel=RTOL)
    assert ev["eval_ep2"]["layout"] == {"tp": 1, "pp": 1, "dp": 2, "ep": 2}


def test_expert_parallel_refusals_come_before_any_model(root):
    """ep > 1 with only dense models, with the distributed optimizer, and with downstream
    tasks: one line naming the field, before a model is built."""
    from nemo_minitron.distill.trainer import train
    from nemo_minitron.evaluate.run import evaluate_checkpoint
    from tests.workers.moe_train import job

    built = rmodel.models_built
    dense = job(root, "dense", "refused", 2)
    dense.model.checkpoint = str(root / "dense")
    with pytest.raises(ValueError, match=re.escape("parallel.ep=2 needs a mixture-of-experts model (model.checkpoint, kd.teacher dense)")):
        train(dense, "distill")
    with pytest.raises(ValueError, match=re.escape("train.distributed_optimizer=true with parallel.ep=2")):
        train(job(root, "teacher", "refused", 2, distributed_optimizer=True), "distill")
    with pytest.raises(ValueError, match=re.escape("model.checkpoint: num_experts=8 is not divisible by parallel.ep=3")):
        train(job(root, "teacher", "refused", 3), "distill")
    data = DataConfig(prefix=str(root / "corpus"), seq_length=32, valid_fraction=0.1)
    with pytest.raises(ValueError, match=re.escape("eval.tasks with parallel.ep=2 is not supported")):
        evaluate_checkpoint(str(root / "student"), ParallelConfig(ep=2), data,
                            EvalConfig(tasks=["arc_easy"]))
    assert rmodel.models_built == built and not (root / "refused").exists()
    from nemo_minitron import preflight

    with pytest.raises(ValueError, match=re.escape("eval.tasks with parallel.ep=2")):
        preflight.evaluate(EvaluateJob(model=ModelConfig(name="s", checkpoint=str(root / "student")),
                                       parallel=ParallelConfig(ep=2), data=data,
                                       eval=EvalConfig(tasks=["arc_easy"])))

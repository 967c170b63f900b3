"""Training and evaluating mixture-of-experts models under expert parallelism: a tiny Mixtral
student distilled from a Mixtral teacher and from a dense Llama teacher (logits plus hidden-state
pairs) follows the same losses, gradient norms, expert load and final weights at parallel.ep=2
as at ep=1 (the same two data-parallel ranks), at ep=2 with the distributed optimizer as without
it, resumes at ep=2 from its own checkpoint (with either optimizer), and evaluates to the same held-out loss and multiple-choice scores; refusals of what ep does not
support come before any model; its distributed-optimizer checkpoint continues at world 4 (expert
state split over two ranks). (torchrun launches: tests/workers/moe_train.py, 2 ranks, and
moe_zero_dp4.py, 4.) The routers'
load-balancing loss (train.moe_aux_loss_coeff) in one process."""

import re

import pytest
import torch

from nemo_minitron.config.schema import (DataConfig, EvalConfig, EvaluateJob, ModelConfig,
                                         ParallelConfig)
from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.convert import sharded
from nemo_minitron.convert.experts import per_expert
from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.distill import state_file
from nemo_minitron.runtime import model as rmodel

from tests.helpers import tiny_corpus, tiny_hf, tiny_tokenizer, torchrun
from tests.test_multiple_choice import write_jsonl_task

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
    write_jsonl_task(tmp / "task.jsonl")
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


def assert_resumed_bitwise(runs, root, name):
    """Run ``name`` again from its step-2 checkpoint (taken, not set aside as unreadable): the
    same metrics and final weights, bit for bit, as the uninterrupted run."""
    again, first = runs[f"{name}_resumed"], runs[name]
    assert not list((root / name / "checkpoints").glob(".*unreadable"))
    assert again["loss"] == first["loss"] and again["grad_norm"] == first["grad_norm"]
    assert again["val_loss"] == first["val_loss"]
    a, b = ckpt.Checkpoint(root / f"{name}.first_final"), ckpt.Checkpoint(root / name / "final")
    assert set(a.keys()) == set(b.keys())
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())


@pytest.mark.multirank
def test_ep2_run_resumes_from_its_checkpoint(rows, root):
    runs, _ = rows
    state = root / "moe_ep2" / "checkpoints" / "step_0000002" / "train_state"
    assert sorted(p.name for p in state.glob("optim-*")) == \
        ["optim-tp0-pp0-ep0.safetensors", "optim-tp0-pp0-ep1.safetensors"]
    # steps 1-2 kept, 3 rerun from the sharded step-2 checkpoint (one file per EP rank): bitwise
    step = root / "moe_ep2" / "checkpoints" / "step_0000002"
    assert sharded.is_sharded(step) and (step / "model-tp0-pp0-ep1.safetensors").exists()
    assert_resumed_bitwise(runs, root, "moe_ep2")


@pytest.mark.multirank
def test_ep2_distributed_optimizer_follows_plain_and_resumes_bitwise(rows, root):
    """At ep=2 on two ranks the distributed optimizer splits the dense state over both (DP 2) and
    keeps each rank's experts whole (expert-DP 1); its losses and weights follow the plain
    optimizer's, each EP rank's file holds the dense state and its own experts in parameter space,
    the run resumes bit-identical, and a plain-optimizer resume of it is refused before a model."""
    import shutil

    from nemo_minitron.distill.trainer import train
    from tests.workers.moe_train import job

    runs, ranked = rows
    zero, plain = runs["moe_ep2_zero"], runs["moe_ep2"]
    for k in ("loss", "grad_norm"):
        assert zero[k] == pytest.approx(plain[k], rel=1e-6), k
    assert zero["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-6)
    a, b = ckpt.Checkpoint(root / "moe_ep2.first_final"), ckpt.Checkpoint(root / "moe_ep2_zero.first_final")
    assert all(torch.allclose(a.get(k), b.get(k), atol=1e-6) for k in a.keys())
    shards = [r for r in ranked if r["run"] == "zero_shards"]
    dense = [r for r in shards if not r["expert"]]
    expert = [r for r in shards if r["expert"]]
    assert len(dense) == len(expert) == 2
    assert all(r["group"] == 2 and 0 < r["owned"] < r["total"] for r in dense)
    assert sum(r["owned"] for r in dense) == dense[0]["total"]
    assert all(r["group"] == 1 and r["owned"] == r["total"] > 0 for r in expert)
    state = root / "moe_ep2_zero" / "checkpoints" / "step_0000002" / "train_state"
    files = [state_file.load(state / f"optim-tp0-pp0-ep{e}.safetensors") for e in (0, 1)]
    assert files[0]["format"] == "model_space/1" and files[0]["params"].keys() == files[1]["params"].keys()
    for name, s0 in files[0]["params"].items():  # dense: the same in both; experts: each its own
        same = torch.equal(s0["exp_avg"], files[1]["params"][name]["exp_avg"])
        assert same == ("experts" not in name) and s0["exp_avg"].abs().sum() > 0, name
    assert_resumed_bitwise(runs, root, "moe_ep2_zero")

    built = rmodel.models_built
    (root / "zero_to_plain" / "checkpoints").mkdir(parents=True)
    shutil.copytree(state.parent, root / "zero_to_plain" / "checkpoints" / state.parent.name)
    with pytest.raises(ValueError, match=re.escape("resume with train.distributed_optimizer=true")):
        train(job(root, "teacher", "zero_to_plain", 2, save_interval=2), "distill")
    assert rmodel.models_built == built and not (root / "zero_to_plain" / "final").exists()


@pytest.mark.multirank
def test_ep2_distributed_optimizer_resumes_at_another_dp_size(rows, root):
    """The world-2 checkpoint of the ep=2 distributed-optimizer run continues at world 4, where
    each expert's state is split over two ranks (expert-DP 2) and the dense state over four: the
    checkpoint is taken (not set aside), step 3 repeats the world-2 loss and the final weights
    follow the world-2 run's within fp32 round-off (a sum over more ranks)."""
    import shutil

    runs, _ = rows
    step = root / "moe_ep2_zero" / "checkpoints" / "step_0000002"
    shutil.copytree(step, root / "zero_dp4" / "checkpoints" / step.name)
    out = torchrun("moe_zero_dp4", 4, root)
    shards = [r for r in out if r.get("run") == "zero_shards"]
    dense = [r for r in shards if not r["expert"]]
    expert = [r for r in shards if r["expert"]]
    assert len(dense) == len(expert) == 4
    assert all(r["group"] == 4 and 0 < r["owned"] < r["total"] for r in dense)
    assert all(r["group"] == 2 and 0 < r["owned"] < r["total"] for r in expert)
    got = next(r for r in out if r.get("run") == "zero_dp4" and "rank" not in r)
    assert not list((root / "zero_dp4" / "checkpoints").glob(".*unreadable"))
    assert len(got["loss"]) == 1  # steps 1-2 came from the checkpoint
    assert got["loss"][0] == pytest.approx(runs["moe_ep2_zero"]["loss"][-1], rel=1e-6)
    a = ckpt.Checkpoint(root / "moe_ep2_zero.first_final")
    b = ckpt.Checkpoint(root / "zero_dp4" / "final")
    assert set(a.keys()) == set(b.keys())
    assert all(torch.allclose(a.get(k), b.get(k), atol=1e-6, rtol=0) for k in a.keys())


@pytest.mark.multirank
def test_evaluate_at_ep2_matches_ep1(rows):
    _, ranked = rows
    ev = {r["run"]: r for r in ranked if r["run"].startswith("eval") and r["rank"] == 0}
    assert ev["eval_ep2"]["tokens"] == ev["eval_ep1"]["tokens"] > 0
    assert ev["eval_ep2"]["loss"] == pytest.approx(ev["eval_ep1"]["loss"], rel=RTOL)
    assert ev["eval_ep2"]["layout"] == {"tp": 1, "pp": 1, "dp": 2, "ep": 2}


@pytest.mark.multirank
def test_multiple_choice_at_ep2_matches_ep1(rows, root):
    """Task scoring at ep=2 pads every rank's micro-batches to common shapes (the dispatcher
    gathers equal-shaped tokens): every rank gets back the scores of ep=1, and `evaluate`
    with the task at ep=2 reports their accuracy."""
    from nemo_minitron.evaluate.multiple_choice import accuracy
    from nemo_minitron.evaluate.tasks import load_task

    _, ranked = rows
    one = [r["scores"] for r in ranked if r["run"] == "mc_ep1"]
    two = [r["scores"] for r in ranked if r["run"] == "mc_ep2"]
    assert len(one) == len(two) == 2
    for a, b in zip(one + two, [one[0]] * 4):
        assert [x for s in a for x in s] == pytest.approx([x for s in b for x in s], rel=RTOL)
    acc = accuracy(load_task(f"jsonl:{root}/task.jsonl"), one[0])["acc"]
    assert [r["acc"] for r in ranked if r["run"] == "eval_tasks_ep2"] == [acc, acc]


def test_expert_parallel_refusals_come_before_any_model(root):
    """ep > 1 with only dense models, with experts that do not split, and a balancing loss for a dense model: one line naming the field, before a model
    is built (evaluate's preflight too)."""
    from nemo_minitron.distill.trainer import train
    from tests.workers.moe_train import job

    built = rmodel.models_built
    dense = job(root, "dense", "refused", 2)
    dense.model.checkpoint = str(root / "dense")
    with pytest.raises(ValueError, match=re.escape("parallel.ep=2 needs a mixture-of-experts model (model.checkpoint, kd.teacher dense)")):
        train(dense, "distill")
    with pytest.raises(ValueError, match=re.escape("model.checkpoint: num_experts=8 is not divisible by parallel.ep=3")):
        train(job(root, "teacher", "refused", 3), "distill")
    aux = job(root, "dense", "refused", 1, moe_aux_loss_coeff=0.01)
    aux.model.checkpoint = str(root / "dense")
    with pytest.raises(ValueError, match=re.escape("train.moe_aux_loss_coeff=0.01 needs a mixture-of-experts model")):
        train(aux, "distill")
    assert rmodel.models_built == built and not (root / "refused").exists()
    from nemo_minitron import preflight

    data = DataConfig(prefix=str(root / "corpus"), seq_length=32, valid_fraction=0.1)
    with pytest.raises(ValueError, match=re.escape("num_experts=8 is not divisible by parallel.ep=3")):
        preflight.evaluate(EvaluateJob(model=ModelConfig(name="s", checkpoint=str(root / "student")),
                                       parallel=ParallelConfig(ep=3), data=data,
                                       eval=EvalConfig(tasks=["arc_easy"])))


# ------------------------------------------------------------------ router load-balancing loss
def switch_loss(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Switch Transformer's load-balancing loss of one layer's router logits [tokens, experts]:
    experts x sum over experts of (share of the top-k choices) x (mean softmax probability)."""
    p = logits.float().softmax(-1)
    chosen = torch.zeros_like(p).scatter(1, p.topk(k, dim=-1).indices, 1.0)
    return p.shape[1] * (chosen.mean(0) / k * p.mean(0)).sum()


def test_load_balancing_loss_reaches_the_router(single_rank):
    """With a coefficient the forward is unchanged, megatron's tracker holds each layer's Switch
    loss, and the last router's gradient gains exactly coefficient x d(loss)/d(weight) (no
    other layer's loss depends on that router); at 0 nothing is tracked."""
    from megatron.core.transformer.moe.moe_utils import (clear_aux_losses_tracker,
                                                         get_moe_layer_wise_logging_tracker)
    from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

    from nemo_minitron.runtime.shard import build_shard, load_state
    from tests.helpers import batch

    hf = tiny_hf("mixtral")
    arch = arch_from_hf_config(hf.config)
    sd, b, coeff = per_expert(hf.state_dict(), arch), batch(arch.vocab_size), 0.1
    got = {}
    for c in (0.0, coeff):
        clear_aux_losses_tracker()
        shard = build_shard(arch, aux_loss_coeff=c)
        load_state(shard, sd.__getitem__)
        shard.model.train()
        seen = []
        handles = [layer.mlp.router.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
                   for layer in shard.model.decoder.layers]
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))  # one micro-batch, no loss scaling
        logits = shard.model(b["tokens"], b["position_ids"], None)
        logits.pow(2).mean().backward()
        for h in handles:
            h.remove()
        tracked = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
        got[c] = (logits.detach(), shard.model.decoder.layers[-1].mlp.router.weight, seen,
                  None if tracked is None else tracked["values"].clone())
    (l0, _, _, none), (l1, router, inputs, tracked) = got[0.0], got[coeff]
    assert torch.equal(l0, l1) and (none is None or not none.any())
    weights = [layer.mlp.router.weight.detach() for layer in shard.model.decoder.layers]
    ref = [switch_loss(x.detach().reshape(-1, arch.hidden_size) @ w.T, arch.moe_top_k)
           for x, w in zip(inputs, weights)]
    assert torch.allclose(tracked, torch.stack(ref), rtol=1e-5), (tracked, ref)
    w = router.detach().clone().requires_grad_()
    switch_loss(inputs[-1].detach().reshape(-1, arch.hidden_size) @ w.T, arch.moe_top_k).backward()
    added = router.grad - got[0.0][1].grad
    assert added.abs().max() > 0
    assert torch.allclose(added, coeff * w.grad, rtol=1e-4, atol=1e-7)
    clear_aux_losses_tracker()


def test_load_balancing_loss_in_training_objective_and_logs(root, single_rank):
    """train.moe_aux_loss_coeff: the step's loss is the LM loss plus coefficient x the layers'
    summed balancing loss (logged as moe_aux_loss, the mean over layers), the first step's LM
    loss is unchanged, its gradient and so the next step's loss are not; at 0 no term and no
    log key."""
    from nemo_minitron.config.schema import FinetuneJob, TrainConfig
    from nemo_minitron.distill.trainer import train

    from tests.helpers.metrics import metrics

    coeff, rows = 0.05, {}
    for c in (0.0, coeff):
        out = root / f"aux_{c}"
        train(FinetuneJob(model=ModelConfig(name="s", checkpoint=str(root / "student")),
                          data=DataConfig(prefix=str(root / "corpus"), seq_length=32,
                                          valid_fraction=0.1), output=str(out),
                          train=TrainConfig(steps=2, global_batch_size=4, micro_batch_size=2,
                                            lr=1e-3, warmup_steps=0, log_interval=1,
                                            eval_interval=0, eval_batches=1, tensorboard=False,
                                            moe_aux_loss_coeff=c)), "finetune")
        rows[c] = [r for r in metrics(out) if "lm" in r]
    plain, aux = rows[0.0], rows[coeff]
    assert len(plain) == len(aux) == 2
    layers = ckpt.Checkpoint(root / "student").arch.num_layers
    for r in plain:
        assert "moe_aux_loss" not in r and r["loss"] == r["lm"]
    for r in aux:
        assert 0 < r["moe_aux_loss"] < 8  # 1 when even; at most the number of experts
        assert r["loss"] == pytest.approx(r["lm"] + coeff * layers * r["moe_aux_loss"], rel=1e-6)
    assert aux[0]["lm"] == pytest.approx(plain[0]["lm"], rel=1e-6)
    assert aux[0]["grad_norm"] != pytest.approx(plain[0]["grad_norm"], rel=1e-6)
    assert aux[1]["lm"] != pytest.approx(plain[1]["lm"], rel=1e-7)

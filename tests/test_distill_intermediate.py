"""Intermediate hidden-state and embedding losses in the distillation loop (single process; the
TP=2 / PP=2 trajectories are checked in test_distill_run.py with the other layouts).

The reference is independent of megatron: the Hugging Face models the checkpoints were made from,
hooked with plain forward hooks, and ``hidden_state_loss`` on what the hooks saw.
"""

import dataclasses
import json
import shutil

import pytest
import torch

from nemo_minitron.config.schema import (DataConfig, DistillJob, KDConfig, ModelConfig,
                                         TrainConfig)
from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.distill import losses as L
from nemo_minitron.distill import state_file
from nemo_minitron.distill.carry import plan_slots
from nemo_minitron.distill.intermediate import check_pairs, pruned_keep_index
from nemo_minitron.pruning.apply import apply_plan
from nemo_minitron.pruning.select import Targets, make_plan, random_importance

from tests.helpers import metrics, tiny_corpus, tiny_hf, tiny_tokenizer

SEQ, GBS, MBS = 32, 4, 2


@pytest.fixture(scope="module")
def kd_models(tmp_path_factory):
    """A tiny teacher; a 'twin' student (the teacher with a perturbed embedding and layer 1);
    a width+depth-pruned student (2 of 4 layers, hidden 96 of 128); a corpus."""
    tmp = tmp_path_factory.mktemp("kdi")
    teacher = tiny_hf("gqa")
    arch = arch_from_hf_config(teacher.config)
    ckpt.save(tmp / "teacher", arch, teacher.state_dict(), tokenizer=tiny_tokenizer())
    twin = tiny_hf("gqa")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (twin.model.embed_tokens.weight, twin.model.layers[1].mlp.down_proj.weight):
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
    ckpt.save(tmp / "twin", arch, twin.state_dict(), tokenizer=tiny_tokenizer())
    plan = make_plan(arch, random_importance(arch, 0),
                     Targets(hidden_size=96, ffn_hidden_size=128, num_layers=2))
    ckpt.save(tmp / "pruned", plan.target, apply_plan(plan, teacher.state_dict()),
              tokenizer=tiny_tokenizer())
    plan.meta["parent"] = str(tmp / "teacher")  # as `minitron prune` writes it
    plan.save(tmp / "pruned" / "plan.json")
    tiny_corpus(tmp / "corpus", n_docs=60)
    # documents over a few dozen token ids: every step sees the same tokens again, so what the
    # student learns about them on one batch shows on the next (not so over all 1000 ids)
    tiny_corpus(tmp / "small", n_docs=60, words=24)
    return tmp, teacher, twin


def kd_job(t, student, out, steps, kd: KDConfig, corpus="corpus", **train):
    return DistillJob(model=ModelConfig(name="tiny", checkpoint=str(t / student)),
                      data=DataConfig(prefix=str(t / corpus), seq_length=SEQ, valid_fraction=0.1),
                      train=TrainConfig(**{**dict(steps=steps, global_batch_size=GBS,
                                                  micro_batch_size=MBS, lr=3e-3, min_lr=3e-4,
                                                  warmup_steps=1, log_interval=1, eval_interval=0,
                                                  eval_batches=2, tensorboard=False), **train}),
                      kd=dataclasses.replace(kd, chunk_tokens=16), output=str(t / out))


def first_step_batches(job):
    """The micro-batches of step 0 at DP=1 (the order ``train`` draws them in)."""
    from nemo_minitron.data.packed import PackedSequences

    data = PackedSequences(job.data.prefix, SEQ, split="train", valid_fraction=0.1,
                           seed=job.train.seed)
    return list(data.batches(MBS, num_batches=GBS // MBS, shuffle=True, seed=job.train.seed,
                             dp_rank=0, dp_size=1))


def hooked(model, layers):
    """Run ``model`` and return {layer: output, "emb": embedding output} ([b, s, h])."""
    got, handles = {}, []
    handles.append(model.model.embed_tokens.register_forward_hook(
        lambda m, i, o: got.__setitem__("emb", o)))
    for layer in layers:
        handles.append(model.model.layers[layer].register_forward_hook(
            lambda m, i, o, k=layer: got.__setitem__(k, o[0] if isinstance(o, tuple) else o)))
    return got, handles


def test_hidden_losses_and_gradient_match_a_direct_computation(kd_models, single_rank):
    """Twin student, fixed weights, no logit loss: the reported hidden/emb losses and the step's
    gradient norm equal hidden_state_loss on hooked Hugging Face outputs (2 micro-batches)."""
    from nemo_minitron.distill.trainer import train

    t, teacher, twin = kd_models
    pairs, wh, we = [[1, 1], [3, 2]], 0.5, 2.0
    kd = KDConfig(teacher=str(t / "teacher"), logit_weight=0.0, hidden_pairs=pairs,
                  hidden_kind="mse", hidden_weight=wh, embedding_weight=we, hidden_dynamic=False)
    job = kd_job(t, "twin", "twin_run", 1, kd, warmup_steps=0)
    train(job, "distill")
    row = metrics(t / "twin_run")[0]

    student = tiny_hf("gqa")
    student.load_state_dict(twin.state_dict())
    student.train()  # no dropout in these configs; grads on
    s_got, s_h = hooked(student, [s for s, _ in pairs])
    t_got, t_h = hooked(teacher, [t_ for _, t_ in pairs])
    sums = {"hidden": 0.0, "emb": 0.0}
    ntok = 0.0
    batches = first_step_batches(job)
    for b in batches:
        student(input_ids=b["tokens"], position_ids=b["position_ids"])
        with torch.no_grad():
            teacher(input_ids=b["tokens"], position_ids=b["position_ids"])
        mask = b["loss_mask"]
        h = sum(L.hidden_state_loss(s_got[s], t_got[t_], kind="mse", mask=mask)[0]
                for s, t_ in pairs)
        e = L.hidden_state_loss(s_got["emb"], t_got["emb"], kind="mse", mask=mask)[0]
        # megatron's normalisation: per micro-batch token mean, averaged over micro-batches
        ((wh * h + we * e) / mask.sum() / len(batches)).backward()
        sums["hidden"] += h.item()
        sums["emb"] += e.item()
        ntok += mask.sum().item()
    for hd in s_h + t_h:
        hd.remove()
    assert sums["hidden"] > 0.01 and sums["emb"] > 0.01  # the perturbation shows
    assert row["hidden"] == pytest.approx(sums["hidden"] / ntok, rel=1e-4)
    assert row["emb"] == pytest.approx(sums["emb"] / ntok, rel=1e-4)
    assert row["loss"] == pytest.approx(wh * row["hidden"] + we * row["emb"], rel=1e-6)
    assert row["alpha"] == 1.0
    norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in student.parameters()
                          if p.grad is not None)).item()
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-4)


def test_config_errors_are_clear(kd_models, tmp_path):
    t, _, _ = kd_models
    for bad, match in (({"hidden_pairs": [[1]]}, r"hidden_pairs\[0\]=\[1\].*\[student_layer"),
                       ({"hidden_pairs": [[0, -1]]}, "0-based"),
                       ({"hidden_pairs": [[0, 1], [0, 1]]}, "twice"),
                       ({"hidden_kind": "l1"}, "cosine or mse"),
                       ({"embedding_weight": -1.0}, "embedding_weight=-1.0 must be >= 0"),
                       ({"hidden_pairs": [[0, 1]], "logit_weight": 0.0}, "hidden_dynamic=false")):
        with pytest.raises(ValueError, match=match):
            KDConfig(**bad)
    KDConfig(hidden_pairs=[[0, 1]], logit_weight=0.0, hidden_dynamic=False)  # fine
    with pytest.raises(ValueError, match=r"the student has 2 layers \(0\.\.1\).*no student layer 2"):
        check_pairs([(0, 1), (2, 3)], 2, 4)
    with pytest.raises(ValueError, match=r"the teacher has 4 layers.*no teacher layer 4"):
        check_pairs([(0, 4)], 2, 4)
    check_pairs([(0, 1), (1, 3), (0, 2), (1, 0)], 2, 4)  # cross-stage pairs are carried
    with pytest.raises(ValueError, match=r"the teacher has 4 layers.*no teacher layer 5"):
        check_pairs([(0, 2), (1, 5)], 2, 4)
    # the README's override composes into the typed job (and a mistyped pair does not)
    from hydra import compose, initialize_config_dir

    from nemo_minitron.cli.main import conf_dir
    from nemo_minitron.config import schema

    schema.register()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("distill", overrides=["kd.hidden_pairs=[[21,29]]", "kd.embedding_weight=1",
                                            "model.checkpoint=s", "data.prefix=d", "output=o"])
        with pytest.raises(Exception, match="hidden_pairs"):
            compose("distill", overrides=["kd.hidden_pairs=[[21,last]]"])
    kd_cfg = schema.to_job(cfg).kd
    assert kd_cfg.hidden_pairs == [[21, 29]] and kd_cfg.hidden_dynamic and kd_cfg.hidden_kind == "cosine"
    # train() refuses before loading any model
    from nemo_minitron.distill.trainer import train

    kd = KDConfig(teacher=str(t / "teacher"), hidden_pairs=[[2, 1]])
    with pytest.raises(ValueError, match="no student layer 2"):
        train(kd_job(t, "pruned", tmp_path / "never", 1, kd, warmup_steps=0), "distill")
    assert not (tmp_path / "never").exists()


def test_carry_slots_of_cross_stage_pairs():
    """Which stage sends, passes on and uses each carried state (PP=4: 8 student layers, 16
    teacher layers, 2 and 4 per stage); same-stage pairs get no slot."""
    slots = plan_slots([(0, 1), (1, 14), (7, 2), (3, 5)], 8, 16, 4)
    assert [(s.pair, s.side, s.src, s.dst) for s in slots] == [
        ((1, 14), "s", 0, 3), ((7, 2), "t", 0, 3)]  # (0, 1) and (3, 5) stay on stages 0 and 1
    assert [slots[0].role(k) for k in range(4)] == ["send", "pass", "pass", "use"]
    assert [s.pair for s in plan_slots([(1, 14), (7, 2)], 8, 16, 1)] == []
    near = plan_slots([(2, 11)], 8, 16, 4)[0]  # student stage 1, teacher stage 2
    assert [near.role(k) for k in range(4)] == ["idle", "send", "use", "idle"]


def test_depth_pruned_student_learns_hidden_states_and_resumes_exactly(kd_models, single_rank):
    """2-layer, hidden-96 student of a 4-layer, hidden-128 teacher, with projections and dynamic
    alpha: the hidden loss falls, alpha follows the previous step's means, the projections are in
    the training state but not in the student checkpoint, and resuming reproduces the run."""
    from nemo_minitron.distill.trainer import train

    t, _, _ = kd_models
    kd = KDConfig(teacher=str(t / "teacher"), hidden_pairs=[[0, 1], [1, 3]], embedding_weight=0.5)
    job = kd_job(t, "pruned", "deep", 6, kd, corpus="small", save_interval=3, keep_checkpoints=5)
    train(job, "distill")
    rows = [r for r in metrics(t / "deep") if "hidden" in r]
    hidden = [r["hidden"] for r in rows]
    # 1.61 -> 1.00 here; logit KD alone (alpha = 0) gets the same student only to 1.27
    assert len(rows) == 6 and hidden[-1] < 0.75 * hidden[0], hidden
    assert rows[0]["alpha"] == 0.0  # the first step measures the intermediate losses
    for prev, cur in zip(rows, rows[1:]):
        want = prev["kd"] / (prev["hidden"] + 0.5 * prev["emb"])
        assert cur["alpha"] == pytest.approx(want, rel=1e-6)
        assert cur["loss"] == pytest.approx(cur["kd"] + cur["alpha"] * (cur["hidden"] + 0.5 * cur["emb"]),
                                            rel=1e-6)
    state = t / "deep" / "checkpoints" / "step_0000003" / "train_state"
    proj = state_file.load(state / "projections-tp0-pp0.safetensors")
    assert sorted(proj) == ["embedding.weight", "layer0_to_1.weight", "layer1_to_3.weight"]
    assert proj["layer0_to_1.weight"].shape == (128, 96)
    assert json.loads((state / "state.json").read_text())["extra"]["alpha"] == rows[3]["alpha"]
    # the projections started from the pruning plan's kept channels (student -> teacher positions)
    keep = json.loads((t / "pruned" / "plan.json").read_text())["keep"]["hidden"]
    assert pruned_keep_index(t / "pruned", t / "teacher", 96, 128).tolist() == keep
    assert pruned_keep_index(t / "pruned", t / "twin", 96, 128) is None  # another teacher
    start = L.make_projection(96, 128, keep_index=torch.tensor(keep)).weight
    assert (proj["embedding.weight"] - start).abs().max() < 0.03  # 2 Adam steps of lr <= 3e-3
    final = ckpt.Checkpoint(t / "deep" / "final")
    assert sorted(final.keys()) == sorted(ckpt.Checkpoint(t / "pruned").keys())

    (t / "deep_resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(t / "deep" / "checkpoints" / "step_0000003",
                    t / "deep_resumed" / "checkpoints" / "step_0000003")
    train(kd_job(t, "pruned", "deep_resumed", 6, kd, corpus="small", save_interval=3), "distill")
    again = [r for r in metrics(t / "deep_resumed") if "hidden" in r]
    assert [r["step"] for r in again] == [4, 5, 6]
    for a, b in zip(rows[3:], again):
        for k in ("loss", "kd", "hidden", "emb", "alpha", "grad_norm"):
            assert a[k] == b[k], (a["step"], k)
    resumed = ckpt.Checkpoint(t / "deep_resumed" / "final")
    for k in final.keys():
        assert torch.equal(final.get(k), resumed.get(k)), k

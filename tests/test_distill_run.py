"""Distillation and teacher correction end to end on tiny models: the loss falls, TP=2/PP=2/DP=2
follow the single-process trajectory, and a run killed mid-way resumes to the same weights."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.pruning.apply import apply_plan
from nemo_minitron.pruning.select import Targets, make_plan, random_importance

from conftest import ROOT, tiny_hf, tiny_tokenizer, torchrun
from test_prune_run import tiny_corpus


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny teacher, a width+depth-pruned student of it, and a corpus."""
    tmp = tmp_path_factory.mktemp("kd")
    hf = tiny_hf("gqa")
    arch = arch_from_hf_config(hf.config)
    ckpt.save(tmp / "teacher", arch, hf.state_dict(), tokenizer=tiny_tokenizer())
    plan = make_plan(arch, random_importance(arch, 0),
                     Targets(hidden_size=96, ffn_hidden_size=128, num_layers=2))
    ckpt.save(tmp / "student", plan.target, apply_plan(plan, hf.state_dict()),
              tokenizer=tiny_tokenizer())
    tiny_corpus(tmp / "corpus", n_docs=60)
    return tmp


def metrics(run):
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def layout_rows(models):
    """One torchrun launch for every 2-rank layout (tests/workers/distill_layouts.py)."""
    t = models
    rows = torchrun("distill_layouts.py", 2, t / "student", t / "teacher", t / "corpus", t)
    return {r["layout"]: r for r in rows}


def reference(t, name, student="student", **kd):
    """The single-process run a layout must follow: (metrics rows, final validation loss)."""
    from distill_layouts import job
    from nemo_minitron.distill.loop import train

    res = train(job(t / student, t / "teacher", t / "corpus", t / name, 1, 1, **kd),
                str(t / "teacher"), dict(logit_weight=1.0, lm_weight=0.5, chunk_tokens=16),
                "distill")
    return metrics(t / name), res["val_loss"]


def assert_follows(row, ref_rows, ref_val, keys=("loss", "grad_norm")):
    for k in keys:
        want = [r[k] for r in ref_rows if k in r]
        assert len(row[k]) == len(want) == 3, (row["layout"], k)
        # Adam hides a mis-scaled gradient in the loss; the norm (used for clipping) does not
        assert row[k] == pytest.approx(want, rel=1e-4, abs=1e-5), (row["layout"], k)
    assert row["val_loss"] == pytest.approx(ref_val, rel=1e-4)


def test_layouts_follow_single_process(models, layout_rows, single_rank):
    ref, ref_val = reference(models, "ref")
    loss = [r["loss"] for r in ref if "loss" in r]
    assert len(loss) == 3 and loss[-1] < loss[0]
    for name in ("tp2", "pp2", "dp2"):
        assert_follows(layout_rows[name], ref, ref_val)


def test_intermediate_losses_follow_single_process_at_tp2_and_pp2(models, layout_rows, single_rank):
    """Hidden-state pairs on both pipeline stages plus the embedding loss (stage 0), with learned
    projections (hidden 96 -> 128): TP=2 and PP=2 follow TP=PP=1 in the losses, the gradient norm
    and alpha; the non-last stage's terms reach the gradient through the injected backward."""
    from distill_layouts import DYNAMIC_KD, HIDDEN_KD

    keys = ("loss", "grad_norm", "hidden", "emb", "alpha")
    ref, ref_val = reference(models, "ref_hidden", **HIDDEN_KD)
    assert all(r["hidden"] > 0.1 and r["emb"] > 0.01 for r in ref if "hidden" in r)
    for name in ("tp2_hidden", "pp2_hidden"):
        assert_follows(layout_rows[name], ref, ref_val, keys)
    ref, ref_val = reference(models, "ref_dynamic", **DYNAMIC_KD)
    alpha = [r["alpha"] for r in ref if "alpha" in r]
    assert alpha[0] == 0.0 and min(alpha[1:]) > 0
    assert_follows(layout_rows["pp2_dynamic"], ref, ref_val, keys)


def test_cross_stage_pairs_follow_single_process_at_pp2(models, layout_rows, single_rank):
    """Pairs split over the two PP=2 stages in both directions (a projected student state and a
    teacher state carried from stage 0 to stage 1) next to a stage-0 pair and the embedding loss:
    the losses, the gradient norm (student layer 0 and its projection get the stage-1 loss's
    gradient only through the p2p backward) and alpha follow TP=PP=1, fixed and dynamic."""
    from distill_layouts import CROSS_DYNAMIC_KD, CROSS_KD
    from nemo_minitron.distill.carry import plan_slots

    slots = plan_slots(CROSS_KD["hidden_pairs"], 2, 4, 2)
    assert [(s.pair, s.side, s.src, s.dst) for s in slots] == [((0, 3), "s", 0, 1),
                                                               ((1, 0), "t", 0, 1)]
    keys = ("loss", "grad_norm", "hidden", "emb", "alpha")
    for kd, name in ((CROSS_KD, "pp2_cross"), (CROSS_DYNAMIC_KD, "pp2_cross_dynamic")):
        ref, ref_val = reference(models, f"ref_{name}", **kd)
        assert all(r["hidden"] > 0.1 for r in ref if "hidden" in r)
        assert_follows(layout_rows[name], ref, ref_val, keys)


def test_cross_stage_pairs_follow_single_process_at_pp4(models, single_rank):
    """One layer per stage (a width-pruned 4-layer student): states carried through stages that
    only pass them on, and a carried pair's loss on a non-last stage, follow TP=PP=1."""
    from distill_pp4 import PP4_KD
    from nemo_minitron.distill.carry import plan_slots

    t = models
    hf = tiny_hf("gqa")
    arch = arch_from_hf_config(hf.config)
    plan = make_plan(arch, random_importance(arch, 0), Targets(hidden_size=96, ffn_hidden_size=128))
    ckpt.save(t / "wide", plan.target, apply_plan(plan, hf.state_dict()),
              tokenizer=tiny_tokenizer())
    slots = plan_slots(PP4_KD["hidden_pairs"], 4, 4, 4)
    assert {s.pair: [s.role(k) for k in range(4)] for s in slots} == {
        (0, 3): ["send", "pass", "pass", "use"], (3, 1): ["idle", "send", "pass", "use"],
        (1, 2): ["idle", "send", "use", "idle"]}
    (row,) = torchrun("distill_pp4.py", 4, t / "wide", t / "teacher", t / "corpus", t / "pp4_cross")
    ref, ref_val = reference(t, "ref_pp4_cross", student="wide", **PP4_KD)
    assert_follows(row, ref, ref_val, ("loss", "grad_norm", "hidden", "emb", "alpha"))


def minitron(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    return subprocess.Popen([sys.executable, "-m", "nemo_minitron", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def distill_args(t, out):
    return ["distill", f"model.checkpoint={t / 'student'}", f"kd.teacher={t / 'teacher'}",
            f"data.prefix={t / 'corpus'}", "data.seq_length=32", "data.valid_fraction=0.1",
            "train.steps=60", "train.global_batch_size=4", "train.micro_batch_size=2",
            "train.lr=1e-3", "train.warmup_steps=1", "train.save_interval=2",
            "train.log_interval=1", "train.eval_interval=0", f"output={out}",
            f"hydra.run.dir={out}_hydra"]


def test_killed_run_resumes_to_identical_weights(models):
    t = models
    p = minitron(*distill_args(t, t / "full"))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert "final validation loss" in out + err

    p = minitron(*distill_args(t, t / "killed"), start_new_session=True)
    deadline = time.time() + 600
    def saved_past_step_4():  # older checkpoints are deleted (keep 2): look for any >= 4
        return any(int(p.name[5:]) >= 4 for p in (t / "killed" / "checkpoints").glob("step_*")
                   if (p / "train_state" / "state.json").is_file())

    while not ((t / "killed" / "checkpoints").is_dir() and saved_past_step_4()):
        assert p.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (t / "killed" / "final").exists()
    p = minitron(*distill_args(t, t / "killed"))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert "resumed from" in out + err
    a, b = ckpt.Checkpoint(t / "full" / "final"), ckpt.Checkpoint(t / "killed" / "final")
    for k in a.keys():
        assert torch.equal(a.get(k), b.get(k)), k
    full, resumed = metrics(t / "full"), metrics(t / "killed")
    assert [r["loss"] for r in full if "loss" in r][-1] == [r["loss"] for r in resumed if "loss" in r][-1]


def test_finetune_lowers_loss(models, single_rank):
    from nemo_minitron.config.schema import DataConfig, FinetuneJob, ModelConfig, TrainConfig
    from nemo_minitron.distill.loop import train

    t = models
    job = FinetuneJob(model=ModelConfig(checkpoint=str(t / "student")),
                      data=DataConfig(prefix=str(t / "corpus"), seq_length=32, valid_fraction=0.1),
                      train=TrainConfig(steps=6, global_batch_size=4, micro_batch_size=2, lr=3e-3,
                                        warmup_steps=1, eval_interval=3, eval_batches=2,
                                        log_interval=1, tensorboard=False),
                      output=str(t / "ft"))
    res = train(job, None, dict(logit_weight=0.0, lm_weight=1.0), "finetune")
    rows = metrics(t / "ft")
    losses = [r["lm"] for r in rows if "lm" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0] + 0.5
    c = ckpt.Checkpoint(res["final"])
    assert c.meta["stage"] == "finetune" and c.arch.hidden_size == 96


def four_steps(t, out, **train_overrides):
    """4 single-process distillation steps saving at step 2 (resumes from checkpoints under out)."""
    from distill_layouts import job
    from nemo_minitron.config.schema import TrainConfig
    from nemo_minitron.distill.loop import train

    j = job(t / "student", t / "teacher", t / "corpus", out, 1, 1, steps=4)
    j.train = TrainConfig(**{**vars(j.train), "save_interval": 2, **train_overrides})
    return train(j, str(t / "teacher"), dict(logit_weight=1.0, lm_weight=0.5, chunk_tokens=16),
                 "distill")


def assert_same_weights(a, b, atol=1e-5):
    a, b = ckpt.Checkpoint(a), ckpt.Checkpoint(b)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert torch.allclose(a.get(k), b.get(k), atol=atol), k


def test_resume_at_a_different_dp_size(models, single_rank):
    """Saved at DP=1 after 2 of 4 steps, finished at DP=2: same weights as an all-DP=1 run."""
    import shutil

    t = models
    four_steps(t, t / "dp1")
    (t / "dp2run").mkdir()
    shutil.copytree(t / "dp1" / "checkpoints", t / "dp2run" / "checkpoints")
    torchrun("distill_resume.py", 2, t / "student", t / "teacher", t / "corpus", t / "dp2run")
    assert ckpt.Checkpoint(t / "dp2run" / "final").meta["step"] == 4
    assert_same_weights(t / "dp1" / "final", t / "dp2run" / "final")
    rows = metrics(t / "dp2run")
    assert [r["step"] for r in rows if "loss" in r] == [3, 4]  # only the remaining steps ran


def test_distributed_optimizer_shards_resume_at_another_dp_size(models, single_rank):
    """The distributed optimizer at DP=2 follows the plain DP=1 run; its step-2 checkpoint (the
    DP shards gathered by parameter name) finishes at DP=1 to the same weights; resuming it
    without the distributed optimizer is refused with the fix."""
    import shutil

    t = models
    four_steps(t, t / "plain1")
    torchrun("distill_resume.py", 2, t / "student", t / "teacher", t / "corpus", t / "zero2",
             "distributed")
    ref, zero2 = metrics(t / "plain1"), metrics(t / "zero2")
    for k in ("loss", "grad_norm"):
        assert [r[k] for r in zero2 if k in r] == pytest.approx([r[k] for r in ref if k in r],
                                                                rel=1e-4, abs=1e-6), k
    assert_same_weights(t / "plain1" / "final", t / "zero2" / "final")
    saved = t / "zero2" / "checkpoints" / "step_0000002"
    blob = torch.load(saved / "train_state" / "optim-tp0-pp0.pt", weights_only=False)
    plain = torch.load(t / "plain1" / "checkpoints" / "step_0000002" / "train_state" /
                       "optim-tp0-pp0.pt", weights_only=False)
    assert blob["format"] == "model_space/1" and len(blob["params"]) == len(plain["state"])
    assert all(v["exp_avg"].abs().sum() > 0 for v in blob["params"].values())

    for name in ("zero_to1", "zero_to_plain"):
        (t / name / "checkpoints").mkdir(parents=True)
        shutil.copytree(saved, t / name / "checkpoints" / saved.name)
    four_steps(t, t / "zero_to1", distributed_optimizer=True)
    assert_same_weights(t / "zero2" / "final", t / "zero_to1" / "final")
    assert [r["step"] for r in metrics(t / "zero_to1") if "loss" in r] == [3, 4]
    with pytest.raises(ValueError, match="train.distributed_optimizer=true"):
        four_steps(t, t / "zero_to_plain")
    assert not (t / "zero_to_plain" / "final").exists()


@pytest.mark.parametrize("sharded", [False, True])
def test_bf16_training_resumes_exactly(models, single_rank, sharded):
    """bf16 weights with fp32 main copies in the optimizer (plain, or sharded by the distributed
    optimizer): the losses follow the fp32 run's within bf16 precision, and a run resumed from its step-2 checkpoint ends bit-identical
    (the fp32 main weights come back from the training state, not from the bf16 checkpoint)."""
    import dataclasses
    import shutil

    from distill_layouts import job
    from nemo_minitron.config.schema import TrainConfig
    from nemo_minitron.distill.loop import train

    t = models
    name = f"bf16_{'sharded' if sharded else 'plain'}"

    def run(out):
        j = job(t / "student", t / "teacher", t / "corpus", out, 1, 1, steps=4)
        j.model = dataclasses.replace(j.model, dtype="bf16")
        j.train = TrainConfig(**{**vars(j.train), "save_interval": 2,
                                 "distributed_optimizer": sharded})
        return train(j, str(t / "teacher"), dict(logit_weight=1.0, lm_weight=0.5, chunk_tokens=16),
                     "distill")

    run(t / name)
    if not (t / "fp32_ref" / "final").exists():
        four_steps(t, t / "fp32_ref")
    want = [r["loss"] for r in metrics(t / "fp32_ref") if "loss" in r]
    got = [r["loss"] for r in metrics(t / name) if "loss" in r]
    assert got == pytest.approx(want, rel=2e-2) and got != want
    final = ckpt.Checkpoint(t / name / "final")
    (t / f"{name}_resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(t / name / "checkpoints" / "step_0000002",
                    t / f"{name}_resumed" / "checkpoints" / "step_0000002")
    run(t / f"{name}_resumed")
    resumed = ckpt.Checkpoint(t / f"{name}_resumed" / "final")
    for k in final.keys():
        assert torch.equal(final.get(k), resumed.get(k)), k


def test_auto_dtype_follows_fp32(models, single_rank):
    """model.dtype=auto (the shipped configs' default) picks this machine's fast dtype (bf16 on
    CPUs with AVX512-BF16/AMX) and trains along the fp32 trajectory within bf16 precision."""
    import dataclasses

    from distill_layouts import job
    from nemo_minitron.config.schema import ModelConfig
    from nemo_minitron.distill.loop import train
    from nemo_minitron.runtime.precision import auto_dtype

    t = models
    j = job(t / "student", t / "teacher", t / "corpus", t / "auto", 1, 1, steps=4)
    j.model = ModelConfig(**{**vars(j.model), "dtype": "auto"})
    assert j.model.dtype == auto_dtype() in ("fp32", "bf16")
    j.train = dataclasses.replace(j.train, save_interval=2)
    train(j, str(t / "teacher"), dict(logit_weight=1.0, lm_weight=0.5, chunk_tokens=16), "distill")
    if not (t / "fp32_ref" / "final").exists():
        four_steps(t, t / "fp32_ref")
    want = [r["loss"] for r in metrics(t / "fp32_ref") if "loss" in r]
    got = [r["loss"] for r in metrics(t / "auto") if "loss" in r]
    assert got == pytest.approx(want, rel=2e-2)
    assert (got != want) == (j.model.dtype == "bf16")

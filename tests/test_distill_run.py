"""Distillation and teacher correction end to end on tiny models: the loss falls, TP=2/PP=2/DP=2
follow the single-process trajectory, and a run killed mid-way resumes to the same weights."""

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.distill import state_file
from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.pruning.apply import apply_plan
from nemo_minitron.pruning.select import Targets, make_plan, random_importance

from tests.helpers import metrics, series, tiny_corpus, tiny_hf, tiny_tokenizer, torchrun
from tests.helpers.proc import minitron_popen as minitron


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


@contextlib.contextmanager
def one_thread():
    """In-process runs compared with torchrun ranks use their thread count (conftest: 1), so
    each rank's kernels reduce in the same order whatever the machine's core count; what is left
    between layouts is the layout's own reduction order (TP splits, DP sums)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def adam_bound(lrs, first_step=1, beta1=0.9, beta2=0.95):
    """Largest difference of one weight between two Adam runs that start from the same state
    and take steps at learning rates ``lrs`` (optimizer steps first_step, first_step+1, ...),
    whatever their gradients: the bound for comparing layouts whose gradients differ in
    round-off, which Adam amplifies on coordinates with near-zero gradients.

    A step moves a weight by lr_t * |m_t'| / (sqrt(v_t') + eps) <= lr_t * B_t: with m_t = (1-b1)
    sum_i b1^(t-i) g_i and v_t = (1-b2) sum_i b2^(t-i) g_i^2, Cauchy-Schwarz gives |m_t| <=
    (1-b1) / sqrt(1-b2) * sqrt(S_t) * sqrt(v_t), S_t = sum_{j<t} (b1^2/b2)^j, and the bias
    corrections m' = m/(1-b1^t), v' = v/(1-b2^t) multiply it by sqrt(1-b2^t) / (1-b1^t).
    Decoupled weight decay (AdamW) scales a difference by 1 - lr*wd <= 1, so two runs drift
    apart by at most 2 * sum_t lr_t * B_t (B_t is about 1 for these betas)."""
    total = 0.0
    for i, lr in enumerate(lrs):
        t = first_step + i
        s_t = sum((beta1 ** 2 / beta2) ** j for j in range(t))
        b_t = (1 - beta1) / (1 - beta2) ** 0.5 * s_t ** 0.5 * (1 - beta2 ** t) ** 0.5 / (1 - beta1 ** t)
        total += 2 * lr * b_t
    return total


@pytest.fixture(scope="module")
def layout_rows(models):
    """One torchrun launch for every 2-rank layout (tests/workers/distill_layouts.py)."""
    t = models
    rows = torchrun("distill_layouts", 2, t / "student", t / "teacher", t / "corpus", t)
    return {r["layout"]: r for r in rows}


def reference(t, name, student="student", **kd):
    """The single-process run a layout must follow: (metrics rows, final validation loss)."""
    from tests.workers.distill_layouts import job
    from nemo_minitron.distill.trainer import train

    with one_thread():
        res = train(job(t / student, t / "teacher", t / "corpus", t / name, 1, 1, **kd), "distill")
    return metrics(t / name), res["val_loss"]


def assert_follows(row, ref_rows, ref_val, keys=("loss", "grad_norm")):
    for k in keys:
        want = [r[k] for r in ref_rows if k in r]
        assert len(row[k]) == len(want) == 3, (row["layout"], k)
        # Adam hides a mis-scaled gradient in the loss; the norm (used for clipping) does not
        assert row[k] == pytest.approx(want, rel=1e-4, abs=1e-5), (row["layout"], k)
    assert row["val_loss"] == pytest.approx(ref_val, rel=1e-4)


@pytest.mark.multirank
def test_layouts_follow_single_process(models, layout_rows, single_rank):
    ref, ref_val = reference(models, "ref")
    loss = [r["loss"] for r in ref if "loss" in r]
    assert len(loss) == 3 and loss[-1] < loss[0]
    for name in ("tp2", "pp2", "dp2"):
        assert_follows(layout_rows[name], ref, ref_val)


@pytest.mark.multirank
def test_intermediate_losses_follow_single_process_at_tp2_and_pp2(models, layout_rows, single_rank):
    """Hidden-state pairs on both pipeline stages plus the embedding loss (stage 0), with learned
    projections (hidden 96 -> 128): TP=2 and PP=2 follow TP=PP=1 in the losses, the gradient norm
    and alpha; the non-last stage's terms reach the gradient through the injected backward."""
    from tests.workers.distill_layouts import DYNAMIC_KD, HIDDEN_KD

    keys = ("loss", "grad_norm", "hidden", "emb", "alpha")
    ref, ref_val = reference(models, "ref_hidden", **HIDDEN_KD)
    assert all(r["hidden"] > 0.1 and r["emb"] > 0.01 for r in ref if "hidden" in r)
    for name in ("tp2_hidden", "pp2_hidden"):
        assert_follows(layout_rows[name], ref, ref_val, keys)
    ref, ref_val = reference(models, "ref_dynamic", **DYNAMIC_KD)
    alpha = [r["alpha"] for r in ref if "alpha" in r]
    assert alpha[0] == 0.0 and min(alpha[1:]) > 0
    assert_follows(layout_rows["pp2_dynamic"], ref, ref_val, keys)


@pytest.mark.multirank
def test_cross_stage_pairs_follow_single_process_at_pp2(models, layout_rows, single_rank):
    """Pairs split over the two PP=2 stages in both directions (a projected student state and a
    teacher state carried from stage 0 to stage 1) next to a stage-0 pair and the embedding loss:
    the losses, the gradient norm (student layer 0 and its projection get the stage-1 loss's
    gradient only through the p2p backward) and alpha follow TP=PP=1, fixed and dynamic."""
    from tests.workers.distill_layouts import CROSS_DYNAMIC_KD, CROSS_KD
    from nemo_minitron.distill.carry import plan_slots

    slots = plan_slots(CROSS_KD["hidden_pairs"], 2, 4, 2)
    assert [(s.pair, s.side, s.src, s.dst) for s in slots] == [((0, 3), "s", 0, 1),
                                                               ((1, 0), "t", 0, 1)]
    keys = ("loss", "grad_norm", "hidden", "emb", "alpha")
    for kd, name in ((CROSS_KD, "pp2_cross"), (CROSS_DYNAMIC_KD, "pp2_cross_dynamic")):
        ref, ref_val = reference(models, f"ref_{name}", **kd)
        assert all(r["hidden"] > 0.1 for r in ref if "hidden" in r)
        assert_follows(layout_rows[name], ref, ref_val, keys)


def fused_vs_logits(t, student, monkeypatch, keys=("loss", "grad_norm"), tag="", **kd):
    """Single-process runs of the logit loss alone (plus ``kd``) with kd.fused_output off and on
    (default): (logits rows, logits val loss, fused row in layout form); asserts which path each
    one took."""
    from nemo_minitron.distill import losses as L

    calls = []
    real = L.fused_output_kl
    monkeypatch.setattr(L, "fused_output_kl", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref, ref_val = reference(t, f"ref_{student}{tag}_logits", student, lm_weight=0.0,
                             fused_output=False, **kd)
    assert not calls
    rows, val = reference(t, f"ref_{student}{tag}_fused", student, lm_weight=0.0, **kd)
    assert len(calls) == 3 * 4  # every micro-batch (3 steps x 4) went through the fused loss
    return ref, ref_val, {"layout": f"{student}{tag}_fused", "val_loss": val,
                          **series(rows, keys)}


@pytest.mark.multirank
def test_fused_output_layer_follows_the_logits_path(models, layout_rows, single_rank, monkeypatch):
    """kd.fused_output (the default with the logit loss alone): both output layers run inside the
    KL chunks and no [tokens, vocab] logits exist. One process follows the materialised-logits
    path in the losses, the gradient norm and the validation loss; so do TP=2 (the vocabulary
    split, the loss all-reducing its hidden-state gradient as the bypassed layer would) and PP=2
    (the output layer on the last stage)."""
    ref, ref_val, fused = fused_vs_logits(models, "student", monkeypatch)
    assert [r["loss"] for r in ref if "loss" in r][-1] < ref[0]["loss"]
    for row in (fused, layout_rows["tp2_fused"], layout_rows["pp2_fused"]):
        assert_follows(row, ref, ref_val)


def test_fused_output_layer_with_intermediate_losses(models, monkeypatch):
    """Hidden-state and embedding losses next to the fused logit loss (dynamic alpha reads the
    logit term): the same losses, gradient norm and alpha as on the logits path."""
    from tests.workers.distill_layouts import DYNAMIC_KD

    keys = ("loss", "grad_norm", "hidden", "emb", "alpha")
    ref, ref_val, fused = fused_vs_logits(models, "student", monkeypatch, keys, "_hidden",
                                          **DYNAMIC_KD)
    assert all(r["hidden"] > 0.1 for r in ref if "hidden" in r)
    assert_follows(fused, ref, ref_val, keys)


def test_fused_output_layer_with_tied_embeddings_and_padded_vocabulary(tmp_path, monkeypatch):
    """A tied output layer (the gradient of the KL reaches the embedding table through the
    fused loss) over a vocabulary of 1001 padded rows: the fused path follows the logits path."""
    hf = tiny_hf("odd_vocab")
    arch = arch_from_hf_config(hf.config)
    ckpt.save(tmp_path / "teacher", arch, hf.state_dict(), tokenizer=tiny_tokenizer())
    plan = make_plan(arch, random_importance(arch, 1), Targets(ffn_hidden_size=128, num_layers=2))
    ckpt.save(tmp_path / "tied", plan.target, apply_plan(plan, hf.state_dict()),
              tokenizer=tiny_tokenizer())
    tiny_corpus(tmp_path / "corpus", n_docs=60)
    assert plan.target.tie_embeddings and plan.target.vocab_size == 1001
    ref, ref_val, fused = fused_vs_logits(tmp_path, "tied", monkeypatch)
    assert_follows(fused, ref, ref_val)


@pytest.mark.multirank
def test_cross_stage_pairs_follow_single_process_at_pp4(models, single_rank):
    """One layer per stage (a width-pruned 4-layer student): states carried through stages that
    only pass them on, and a carried pair's loss on a non-last stage, follow TP=PP=1."""
    from tests.workers.distill_pp4 import PP4_KD
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
    (row,) = torchrun("distill_pp4", 4, t / "wide", t / "teacher", t / "corpus", t / "pp4_cross")
    ref, ref_val = reference(t, "ref_pp4_cross", student="wide", **PP4_KD)
    assert_follows(row, ref, ref_val, ("loss", "grad_norm", "hidden", "emb", "alpha"))


def distill_args(t, out):
    return ["distill", f"model.checkpoint={t / 'student'}", f"kd.teacher={t / 'teacher'}",
            f"data.prefix={t / 'corpus'}", "data.seq_length=32", "data.valid_fraction=0.1",
            "train.steps=60", "train.global_batch_size=4", "train.micro_batch_size=2",
            "train.lr=1e-3", "train.warmup_steps=1", "train.save_interval=2",
            "train.log_interval=1", "train.eval_interval=0", f"output={out}",
            f"hydra.run.dir={out}_hydra"]


def stop_inside_a_save(p, run, deadline):
    """SIGSTOP process group ``p`` while it writes a checkpoint past step 4 (a ``.step_*.partial-*``
    directory exists and stays while it is stopped), then SIGKILL it there."""
    ckdir = run / "checkpoints"
    while True:
        assert p.poll() is None and time.time() < deadline, "run ended before it could be killed"
        partial = list(ckdir.glob(".step_*.partial-*")) if ckdir.is_dir() else []
        if partial and int(partial[0].name[6:13]) > 4:
            os.killpg(p.pid, signal.SIGSTOP)
            if list(ckdir.glob(".step_*.partial-*")):  # not committed in between
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                return
            os.killpg(p.pid, signal.SIGCONT)
        time.sleep(0.005)


def test_killed_run_resumes_to_identical_weights(models):
    """kill -9 inside a save, and the newest complete checkpoint then truncated: the relaunch
    removes the unfinished save, falls back to the previous checkpoint and ends bit-identical to
    an uninterrupted run, logging each step once; keep_checkpoints=2 retention holds."""
    t = models
    p = minitron(*distill_args(t, t / "full"))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert "final validation loss" in out + err
    kept = sorted(x.name for x in (t / "full" / "checkpoints").iterdir())
    assert kept == ["step_0000056", "step_0000058"]  # keep_checkpoints=2 of saves every 2 steps

    run = t / "killed"
    p = minitron(*distill_args(t, run), start_new_session=True)
    stop_inside_a_save(p, run, time.time() + 600)
    assert not (run / "final").exists()
    complete = sorted((run / "checkpoints").glob("step_*"))
    assert len(complete) == 2, complete
    newest = complete[-1] / "model-00001-of-00001.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a broken copy
    p = minitron(*distill_args(t, run))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    log = out + err
    assert f"resumed from {complete[0]} at step" in log
    assert "unfinished save" in log and f"checkpoint {complete[1]} cannot be resumed" in log
    assert not list((run / "checkpoints").glob(".step_*.partial-*"))
    a, b = ckpt.Checkpoint(t / "full" / "final"), ckpt.Checkpoint(run / "final")
    for k in a.keys():
        assert torch.equal(a.get(k), b.get(k)), k
    full, resumed = metrics(t / "full"), metrics(run)
    assert [r["step"] for r in resumed if "loss" in r] == list(range(1, 61))  # no step twice
    assert [r["loss"] for r in full if "loss" in r] == [r["loss"] for r in resumed if "loss" in r]


@pytest.mark.multirank
def test_kill_inside_a_sharded_save_resumes_to_identical_weights(models):
    """TP=2 with sharded checkpoints (train.sharded_save): rank 1 SIGKILLs itself inside the
    step-4 save, after writing its own slices; the relaunch removes the unfinished save, resumes
    from the sharded step-2 checkpoint and ends bit-identical to an uninterrupted run, logging
    each step once (tests/workers/sharded_killed.py)."""
    from nemo_minitron.convert import sharded

    t = models
    torchrun("sharded_killed", 2, t / "student", t / "teacher", t / "corpus", t / "tp2kill",
             "first", check=False)
    run = t / "tp2kill" / "killed"
    assert max(r["step"] for r in metrics(run) if "loss" in r) == 4 and not (run / "final").exists()
    assert [p.name for p in sorted((run / "checkpoints").glob("step_*"))] == ["step_0000002"]
    assert sharded.is_sharded(run / "checkpoints" / "step_0000002")
    for left in ckpt.partials(run / "checkpoints"):  # what the killed save left, if rank 0 did not
        assert left.name.startswith(".step_0000004") and not (left / sharded.INDEX).exists()
    (row,) = torchrun("sharded_killed", 2, t / "student", t / "teacher", t / "corpus",
                      t / "tp2kill", "again")
    assert row == {"equal": True, "steps": [1, 2, 3, 4, 5, 6]}
    assert not ckpt.partials(run / "checkpoints")


def test_finished_run_is_left_alone_unless_overwrite(models, single_rank, caplog):
    """Re-running a finished run trains nothing and appends nothing; a larger train.steps
    continues from its last checkpoint; overwrite=true trains again from the start."""
    from tests.workers.distill_layouts import job
    from nemo_minitron.config.schema import TrainConfig
    from nemo_minitron.distill.trainer import train

    t = models
    run = t / "finished"
    four_steps(t, run)
    before = (run / "metrics.jsonl").read_text()
    final = ckpt.Checkpoint(run / "final")
    res = four_steps(t, run)
    assert res["already_finished"] and res["steps"] == 4
    assert (run / "metrics.jsonl").read_text() == before
    assert ckpt.Checkpoint(run / "final").meta["created"] == final.meta["created"]
    caplog.set_level(logging.WARNING)
    res = four_steps(t, run, steps=5)  # more steps: resumes from step 2, logs 3..5 once
    assert res["steps"] == 5
    assert "final was trained for 4 steps; continuing to train.steps=5 from step_0000002" \
        in caplog.text
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2, 3, 4, 5]
    j = job(t / "student", t / "teacher", t / "corpus", run, 1, 1, steps=2)
    j.train = TrainConfig(**{**vars(j.train), "save_interval": 1})
    j.overwrite = True
    with one_thread():
        train(j, "distill")
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2]
    assert sorted(x.name for x in (run / "checkpoints").iterdir()) == ["step_0000001"]
    assert ckpt.Checkpoint(run / "final").meta["step"] == 2


def test_finetune_lowers_loss(models, single_rank):
    from nemo_minitron.config.schema import DataConfig, FinetuneJob, ModelConfig, TrainConfig
    from nemo_minitron.distill.trainer import train

    t = models
    job = FinetuneJob(model=ModelConfig(checkpoint=str(t / "student")),
                      data=DataConfig(prefix=str(t / "corpus"), seq_length=32, valid_fraction=0.1),
                      train=TrainConfig(steps=6, global_batch_size=4, micro_batch_size=2, lr=3e-3,
                                        warmup_steps=1, eval_interval=3, eval_batches=2,
                                        log_interval=1, tensorboard=False),
                      output=str(t / "ft"))
    res = train(job, "finetune")
    rows = metrics(t / "ft")
    losses = [r["lm"] for r in rows if "lm" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0] + 0.5
    c = ckpt.Checkpoint(res["final"])
    assert c.meta["stage"] == "finetune" and c.arch.hidden_size == 96


def four_steps(t, out, **train_overrides):
    """4 single-process distillation steps saving at step 2 (resumes from checkpoints under out)."""
    from tests.workers.distill_layouts import job
    from nemo_minitron.config.schema import TrainConfig
    from nemo_minitron.distill.trainer import train

    j = job(t / "student", t / "teacher", t / "corpus", out, 1, 1, steps=4)
    j.train = TrainConfig(**{**vars(j.train), "save_interval": 2, **train_overrides})
    with one_thread():
        return train(j, "distill")


def assert_same_weights(a, b, atol):
    a, b = ckpt.Checkpoint(a), ckpt.Checkpoint(b)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert torch.allclose(a.get(k), b.get(k), rtol=0, atol=atol), \
            (k, (a.get(k) - b.get(k)).abs().max().item(), atol)


def assert_same_run(a, b, steps):
    """Runs ``a`` and ``b`` (DP sizes differ from step ``steps[0]``) agree: losses and gradient
    norms of those steps to round-off, weights within :func:`adam_bound` of their learning
    rates (the loss trajectory is what catches a wrong resume; the weights, that the state
    carried over)."""
    ra = {r["step"]: r for r in metrics(a) if "loss" in r}
    rb = {r["step"]: r for r in metrics(b) if "loss" in r}
    for k in ("loss", "grad_norm"):
        assert [rb[s][k] for s in steps] == pytest.approx([ra[s][k] for s in steps],
                                                          rel=1e-4, abs=1e-6), k
    assert_same_weights(Path(a) / "final", Path(b) / "final",
                        adam_bound([ra[s]["lr"] for s in steps], first_step=steps[0]))


@pytest.mark.multirank
def test_resume_at_a_different_dp_size(models, single_rank):
    """Saved at DP=1 after 2 of 4 steps, finished at DP=2: same weights as an all-DP=1 run."""
    import shutil

    t = models
    four_steps(t, t / "dp1")
    (t / "dp2run").mkdir()
    shutil.copytree(t / "dp1" / "checkpoints", t / "dp2run" / "checkpoints")
    torchrun("distill_resume", 2, t / "student", t / "teacher", t / "corpus", t / "dp2run")
    assert ckpt.Checkpoint(t / "dp2run" / "final").meta["step"] == 4
    assert_same_run(t / "dp1", t / "dp2run", [3, 4])
    rows = metrics(t / "dp2run")
    assert [r["step"] for r in rows if "loss" in r] == [3, 4]  # only the remaining steps ran


@pytest.mark.multirank
def test_distributed_optimizer_shards_resume_at_another_dp_size(models, single_rank):
    """The distributed optimizer at DP=2 follows the plain DP=1 run; its step-2 checkpoint (the
    DP shards gathered by parameter name) finishes at DP=2 bit-identical and at DP=1 to the
    same run (within round-off of the DP sums, see assert_same_run); resuming it without the
    distributed optimizer is refused with the fix."""
    import shutil

    t = models
    four_steps(t, t / "plain1")
    (again,) = torchrun("distill_resume", 2, t / "student", t / "teacher", t / "corpus",
                        t / "zero2", "distributed", "again")
    assert again == {"again_equal": True, "steps": 4}  # DP=2 -> DP=2: bit-identical
    assert_same_run(t / "plain1", t / "zero2", [1, 2, 3, 4])
    saved = t / "zero2" / "checkpoints" / "step_0000002"
    blob = state_file.load(saved / "train_state" / "optim-tp0-pp0.safetensors")
    plain = state_file.load(t / "plain1" / "checkpoints" / "step_0000002" / "train_state" /
                            "optim-tp0-pp0.safetensors")
    assert blob["format"] == "model_space/1" and len(blob["params"]) == len(plain["state"])
    assert all(v["exp_avg"].abs().sum() > 0 for v in blob["params"].values())

    for name in ("zero_to1", "zero_to_plain"):
        (t / name / "checkpoints").mkdir(parents=True)
        shutil.copytree(saved, t / name / "checkpoints" / saved.name)
    four_steps(t, t / "zero_to1", distributed_optimizer=True)
    assert_same_run(t / "zero2", t / "zero_to1", [3, 4])
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

    from tests.workers.distill_layouts import job
    from nemo_minitron.config.schema import TrainConfig
    from nemo_minitron.distill.trainer import train

    t = models
    name = f"bf16_{'sharded' if sharded else 'plain'}"

    def run(out):
        j = job(t / "student", t / "teacher", t / "corpus", out, 1, 1, steps=4)
        j.model = dataclasses.replace(j.model, dtype="bf16")
        j.train = TrainConfig(**{**vars(j.train), "save_interval": 2,
                                 "distributed_optimizer": sharded})
        return train(j, "distill")

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

    from tests.workers.distill_layouts import job
    from nemo_minitron.config.schema import ModelConfig
    from nemo_minitron.distill.trainer import train
    from nemo_minitron.runtime.precision import auto_dtype

    t = models
    j = job(t / "student", t / "teacher", t / "corpus", t / "auto", 1, 1, steps=4)
    j.model = ModelConfig(**{**vars(j.model), "dtype": "auto"})
    assert j.model.dtype == auto_dtype() in ("fp32", "bf16")
    j.train = dataclasses.replace(j.train, save_interval=2)
    train(j, "distill")
    if not (t / "fp32_ref" / "final").exists():
        four_steps(t, t / "fp32_ref")
    want = [r["loss"] for r in metrics(t / "fp32_ref") if "loss" in r]
    got = [r["loss"] for r in metrics(t / "auto") if "loss" in r]
    assert got == pytest.approx(want, rel=2e-2)
    assert (got != want) == (j.model.dtype == "bf16")


def test_validation_reads_the_held_out_split_at_most_once(models, single_rank, monkeypatch):
    """train.eval_batches beyond the held-out split validates on one pass of it (more passes
    score the same samples again: 10**9 ran for ever)."""
    from nemo_minitron.config.schema import DataConfig, FinetuneJob, ModelConfig, TrainConfig
    from nemo_minitron.data.packed import PackedSequences
    from nemo_minitron.distill import trainer

    t = models
    data = DataConfig(prefix=str(t / "corpus"), seq_length=32, valid_fraction=0.1)
    one_pass = len(PackedSequences(data.prefix, 32, split="valid", valid_fraction=0.1)) // 2
    seen = []

    def counted(model, batches, **kw):
        batches = list(batches)
        seen.append(len(batches))
        return real(model, iter(batches), **kw)

    real = trainer.validation_loss
    monkeypatch.setattr(trainer, "validation_loss", counted)
    job = FinetuneJob(model=ModelConfig(checkpoint=str(t / "student")), data=data,
                      train=TrainConfig(steps=2, global_batch_size=2, micro_batch_size=2,
                                        warmup_steps=0, eval_interval=1,
                                        eval_batches=3 * one_pass + 1,
                                        log_interval=1, tensorboard=False),
                      output=str(t / "ft_capped"))
    trainer.train(job, "finetune")
    assert one_pass >= 1 and seen == [one_pass, one_pass]
    vals = [r["val_loss"] for r in metrics(t / "ft_capped") if "val_loss" in r]
    assert len(vals) == 2 and all(v == v for v in vals)

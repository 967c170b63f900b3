"""Training that can be trusted with a long job: a divergence stops with one clear message and
leaves the last finite checkpoint (no export after it), a resume never unpickles a file from the
run directory, and resumable state is exact at TP=2 and PP=2 (one torchrun launch)."""

import shutil

import pytest
import torch

from nemo_minitron.artifacts import atomic
from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.distill.guard import TrainingDiverged

from tests.helpers import metrics, torchrun
from tests.helpers.proc import minitron_popen as minitron
from tests.test_distill_run import distill_args, models  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def guard_rows(models):  # noqa: F811
    t = models
    rows = torchrun("guard_layouts", 2, t / "student", t / "teacher", t / "corpus",
                    t / "guard")
    return rows


def finite_checkpoints(run):
    """Step checkpoints under ``run`` (names), each asserted to hold finite weights only."""
    names = []
    for p in sorted((run / "checkpoints").glob("step_*")):
        c = ckpt.Checkpoint(p)
        assert all(torch.isfinite(c.get(k)).all() for k in c.keys()), p
        names.append(p.name)
    return names


@pytest.mark.multirank
def test_distributed_optimizer_and_bf16_resume_exactly_at_tp2_and_pp2(guard_rows):
    """As at TP=1 (test_distill_run): a copy of the step-2 checkpoint finishes bit-identical."""
    cases = {r["case"]: r for r in guard_rows if r["case"] != "diverged"}
    assert sorted(cases) == ["pp2_bf16", "pp2_fp32_distributed", "tp2_bf16",
                             "tp2_fp32_distributed"]
    for name, r in cases.items():
        assert r["step"] == 4 and r["equal"], name
        # TP=2 steps resume from sharded checkpoints (train.sharded_save); final/ stays whole
        assert r["sharded_step"] == name.startswith("tp2") and not r["sharded_final"], name


@pytest.mark.multirank
def test_divergence_at_pp2_stops_every_rank_alike(guard_rows, models):  # noqa: F811
    """lr=1e6 at PP=2: the first non-finite step is skipped (skip_nonfinite_steps=1), the next
    stops both stages in the same step with the same message; checkpoints stay finite."""
    msgs = [r["message"] for r in guard_rows if r["case"] == "diverged"]
    assert len(msgs) == 2 and msgs[0] == msgs[1] and msgs[0] is not None
    run = models / "guard" / "diverged"
    rows = metrics(run)
    skipped = [r["step"] for r in rows if r.get("nonfinite")]
    assert len(skipped) == 1
    stopped = max(r["step"] for r in rows) + 1
    assert f"training diverged at step {stopped} " in msgs[0] and "\n" not in msgs[0]
    kept = finite_checkpoints(run)
    assert len(kept) == 2 and f"{run}/checkpoints/{kept[-1]}" in msgs[0]
    assert int(kept[-1][5:]) == stopped - 1 and not (run / "final").exists()


def test_cli_divergence_exits_nonzero_with_one_line(models):  # noqa: F811
    t = models
    out = t / "cli_lr1e6"
    args = [a for a in distill_args(t, out) if not a.startswith(("train.lr=", "train.save_"))]
    p = minitron(*args, "train.lr=1e6", "train.save_interval=1", "train.keep_checkpoints=2")
    _, err = p.communicate(timeout=600)
    assert p.returncode == 2, err[-3000:]
    errors = [x for x in err.splitlines() if "error" in x.lower()]
    assert len(errors) == 1 and errors[0].startswith("minitron distill: error: training "
                                                     "diverged at step "), err[-3000:]
    kept = finite_checkpoints(out)
    assert kept and f"{out}/checkpoints/{kept[-1]}" in errors[0]
    assert "train.lr (now 1e+06)" in errors[0] and not (out / "final").exists()


def test_pipeline_stops_before_evaluating_or_exporting_a_diverged_student(tmp_path, single_rank):
    import dataclasses

    from nemo_minitron.config.schema import PipelineConfig
    from nemo_minitron.pipeline import run_pipeline

    from tests.helpers import tiny_workspace
    from tests.test_pipeline import make_job

    tiny_workspace(tmp_path)
    job = make_job(tmp_path)
    job.train = dataclasses.replace(job.train, lr=1e6, min_lr=0.0, steps=12, save_interval=1)
    job.pipeline = PipelineConfig(rounds=job.pipeline.rounds[:1])
    rd = tmp_path / "run" / "round1"
    # what saves killed in an earlier attempt leave (named by the writers' own partial_name)
    stale = [atomic.partial_name(rd / "pruned"),
             atomic.partial_name(rd / "distill" / "checkpoints" / "step_0000002")]
    for p in stale:
        p.mkdir(parents=True)
    with pytest.raises(TrainingDiverged, match="training diverged at step"):
        run_pipeline(job)
    assert not any(p.exists() for p in stale)
    assert (rd / "pruned" / ckpt.META).is_file()
    assert finite_checkpoints(rd / "distill")
    leftover = sorted(p.name for p in rd.iterdir())
    assert leftover == ["distill", "pruned"], leftover  # no eval_*.json, no hf/
    assert not (tmp_path / "run" / "summary.json").exists()


class Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def two_steps(t, out):
    """2 single-process steps saving a checkpoint after step 1 (resumes from one under out)."""
    from tests.test_distill_run import four_steps

    return four_steps(t, out, steps=2, save_interval=1)


def test_resume_never_unpickles(models, single_rank):  # noqa: F811
    """A payload planted in each file a resume reads (and as the old pickle files) never runs:
    the resume falls back past the checkpoint it spoils, ignores it, or refuses in one line."""
    t = models
    base = t / "payload_base"
    two_steps(t, base)
    shutil.rmtree(base / "final")
    step1 = base / "checkpoints" / "step_0000001"
    # every file of the run directory a resume opens (the tokenizer is read from model.checkpoint,
    # never from a training checkpoint)
    files = sorted(p.relative_to(base) for p in base.rglob("*")
                   if p.is_file() and ckpt.TOKENIZER not in p.parts)
    assert {"train_state/optim-tp0-pp0.safetensors", "train_state/rng-rank0.safetensors",
            "train_state/state.json", "model-00001-of-00001.safetensors",
            "arch.json", ckpt.META, ckpt.INDEX} <= {str(p.relative_to(step1.relative_to(base)))
                                                    for p in files if p.parts[0] == "checkpoints"}
    marker = t / "payload_ran"
    cases = [("plant", f) for f in files] + [("old_names", None), ("old_format", None)]
    outcomes = {}
    for i, (kind, f) in enumerate(cases):
        run = t / f"payload_{i}"
        shutil.copytree(base, run)
        ts = run / step1.relative_to(base) / "train_state"
        if kind == "plant":
            torch.save({"state": Payload(marker)}, run / f)
        else:  # the earlier format's file names, next to (old_names) or instead of the new ones
            for name in ("optim-tp0-pp0", "rng-rank0"):
                torch.save({"state": Payload(marker)}, ts / f"{name}.pt")
                if kind == "old_format":
                    (ts / f"{name}.safetensors").unlink()
        try:
            res = two_steps(t, run)
            aside = (run / "checkpoints" / ".step_0000001.unreadable").is_dir()
            outcomes[str(f or kind)] = "fell back" if aside else "resumed"
            steps = [r["step"] for r in metrics(run) if "loss" in r]
            assert steps[-1] == 2 and len(set(steps)) == len(steps), steps  # each step once
            assert steps == [1, 2] or not aside, steps
        except ValueError as e:
            assert "\n" not in str(e) and str(ts) in str(e), e
            outcomes[str(f or kind)] = "refused"
        assert not marker.exists(), (kind, f)
        if outcomes[str(f or kind)] != "refused":
            assert ckpt.Checkpoint(res["final"]).meta["step"] == 2
    assert outcomes["old_format"] == "refused" and outcomes["old_names"] == "resumed", outcomes
    spoiled = f"{step1.relative_to(base)}/train_state/optim-tp0-pp0.safetensors"
    assert outcomes[spoiled] == "fell back"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_check_sees_every_nonfinite_element_and_no_overflow(dtype):
    """The guard's check: one NaN or infinity anywhere is caught; huge finite values, whose sum
    overflows, are not taken for a divergence; empty tensors and missing gradients are skipped."""
    from nemo_minitron.distill.guard import _all_finite

    def grads():
        return [torch.zeros(3, 5, dtype=dtype), None, torch.zeros(0, dtype=dtype),
                torch.full((1000,), 3e38).to(dtype)]
    assert _all_finite(grads()) and _all_finite([])
    for bad in (float("nan"), float("inf"), -float("inf")):
        for which in (0, 3):
            g = grads()
            g[which].view(-1)[-1] = bad
            assert not _all_finite(g), (bad, which)


def test_nonfinite_input_weights_named_before_a_step(models):  # noqa: F811
    """A student saved with a NaN weight trained one step and stopped as "diverged at step 1:
    lower train.lr"; now the input is named before any step, and no metrics are begun."""
    t = models
    c = ckpt.Checkpoint(t / "student")
    tensors = {k: c.get(k).clone() for k in c.keys()}
    name = next(k for k in tensors if "mlp" in k)
    tensors[name].view(-1)[3] = float("nan")
    from tests.helpers import tiny_tokenizer

    bad = ckpt.save(t / "student_nan", c.arch, tensors, tokenizer=tiny_tokenizer())
    out = t / "nan_run"
    args = [a.replace(str(t / "student"), str(bad)) for a in distill_args(t, out)]
    p = minitron(*args)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"minitron distill: error: model.checkpoint={bad} holds non-finite "
                           "weights"), err[-3000:]
    assert not (out / "metrics.jsonl").exists() and not (out / "final").exists()


def test_ctrl_c_is_one_line_and_the_rerun_resumes(models):  # noqa: F811
    import signal
    import time

    t = models
    out = t / "interrupted"
    p = minitron(*distill_args(t, out))
    deadline = time.time() + 300
    while not list((out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() \
            else True:
        assert p.poll() is None and time.time() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "minitron distill: interrupted; the same command resumes from the last checkpoint or "
        "finished stage"), err[-3000:]
    assert list((out / "checkpoints").glob("step_*")) and not (out / "final").exists()
    # a resume under another sample order was silent; the same command resumes
    other = [a if not a.startswith("data.seq_length=") else "data.seq_length=16"
             for a in distill_args(t, out)]
    p = minitron(*other)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and err.strip().splitlines()[-1].startswith(
        f"minitron distill: error: output={out} holds a run trained with data.seq_length=32 "
        "(checkpoints/step_"), err[-3000:]
    p = minitron(*distill_args(t, out))
    log, err = p.communicate(timeout=600)
    assert p.returncode == 0 and "resumed from" in log + err, err[-3000:]
    assert (out / "final").is_dir()


def test_second_job_on_a_live_output_is_refused(models):  # noqa: F811
    """Two jobs on one output both resumed from the same checkpoint and wrote the same files
    (the second one failed later on a checkpoint directory the first had written)."""
    import time

    t = models
    out = t / "locked"
    args = [a for a in distill_args(t, out) if not a.startswith("train.steps=")]
    first = minitron(*args, "train.steps=100000")
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").is_file():
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.05)
        second = minitron(*args, "train.steps=100000")
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err[-3000:]
        assert err.strip().splitlines()[-1] == (
            f"minitron distill: error: output={out} is in use by another running minitron job "
            f"(pid {first.pid}); wait for it to end, stop it, or choose another output")
        assert first.poll() is None  # the first one trains on
    finally:
        first.kill()
        first.communicate()
    from nemo_minitron.artifacts import output_lock

    output_lock.release(output_lock.acquire(out))  # the lock went with the killed process

"""`minitron pipeline` killed (SIGKILL) inside each of its stages — teacher correction, prune,
distill, evaluate, export, a search round — and relaunched each time, ends with the result of an
uninterrupted run: every tensor bit for bit, every results file number for number.

Tiny stages last milliseconds, so a kill from outside at a moment would land anywhere; the runs
go through tests/workers/pipeline_killed.py instead, which SIGKILLs its own process at a chosen
point inside a stage (a save's temporary directory written but not renamed, a training step not
yet logged, a results file's temporary copy written). One chain of launches: each relaunch
resumes the previous kill and is itself killed in the next stage; the uninterrupted reference
runs beside it."""

import json
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from nemo_minitron.convert import checkpoint as ckpt

from tests.helpers import metrics, minitron_popen, read_jsonl, tiny_workspace

# (kill point, what the relaunch must say it found); in the order the pipeline reaches them
KILLS = [
    ("commit:teacher_correction/final", "unfinished save"),  # after its last step, saving
    ("commit:round1/pruned", "unfinished save"),
    ("step:round1/distill@3",
     "resumed from {run}/round1/distill/checkpoints/step_0000002 at step 2"),
    ("result:round1/eval_distilled.json", "unfinished save"),
    ("commit:round1/hf", "unfinished save"),
    ("step:round2/search/cand_1/distill@2", "[candidate 0: distill 2 steps] complete, skipped"),
]
# what differs between any two runs: wall times, creation times, throughput
VOLATILE = {"seconds", "stage_seconds", "stage_seconds_all", "seconds_all", "created",
            "calibration_s", "tokens_per_s"}


def args(t, out):
    return ["pipeline", "model.name=tiny", f"model.checkpoint={t / 'teacher'}",
            f"data.prefix={t / 'corpus'}", "data.seq_length=32", "data.valid_fraction=0.1",
            "prune.calib_samples=8", "prune.micro_batch_size=2", "train.steps=4",
            "train.global_batch_size=4", "train.micro_batch_size=2", "train.lr=1e-3",
            "train.warmup_steps=1", "train.eval_interval=0", "train.eval_batches=2",
            "train.log_interval=1", "train.save_interval=2", "train.tensorboard=false",
            "kd.chunk_tokens=16", "eval.micro_batch_size=2", "eval.num_batches=2", "eval.tasks=[]",
            "pipeline.teacher_correction_steps=4",
            "pipeline.rounds=[{target:{hidden_size:96,ffn_hidden_size:192}},{budget:0.6}]",
            "search.tolerance=0.08", "search.layer_step=1", "search.hidden_multiple=32",
            "search.ffn_multiple=64", "search.max_candidates=2", "search.steps=2", f"output={out}"]


def launch(t, out, point):
    # one thread, as in the reference: the same kernels reduce in the same order
    return minitron_popen(point, *args(t, out), module="tests.workers.pipeline_killed",
                          env=dict(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
                          stderr=subprocess.STDOUT)


def inside(run, point) -> str:
    """Asserts the kill left the stage unfinished (so it was inside it); returns what it left."""
    kind, _, where = point.partition(":")
    if kind == "commit":
        final = run / where
        left = list(final.parent.glob(f".{final.name}.partial-*"))
        assert left and not final.exists(), point
    elif kind == "step":
        d, _, n = where.rpartition("@")
        rows = metrics(run / d)
        assert max(r["step"] for r in rows) == int(n) - 1 and not (run / d / "final").exists()
        left = sorted((run / d / "checkpoints").glob("step_*"))
    else:
        final = run / where
        left = list(final.parent.glob(f".{final.name}.partial-*"))
        assert len(left) == 1 and left[0].is_file() and not final.exists(), point
    return str(left)


def normalized(obj, run):
    if isinstance(obj, dict):
        return {k: normalized(v, run) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [normalized(v, run) for v in obj]
    return obj.replace(str(run), "RUN") if isinstance(obj, str) else obj


def results(run) -> dict:
    """Every file of a pipeline directory a user reads results from, comparable across runs:
    tensors as tensors, JSON without its volatile keys (paths relative to the run)."""
    out = {}
    for p in sorted(run.rglob("*")):
        rel = str(p.relative_to(run))
        if not p.is_file() or rel.startswith("hydra/") or p.suffix in (".png", ".md") \
                or ckpt.TOKENIZER in p.parts or rel == "stage_seconds.json":  # timings only
            continue
        if p.suffix == ".safetensors":
            out[rel] = load_file(p)
        elif p.suffix == ".json":
            out[rel] = normalized(json.loads(p.read_text()), run)
        elif p.suffix == ".jsonl":
            out[rel] = [normalized(x, run) for x in read_jsonl(p)]
        else:
            out[rel] = p.read_bytes()
    out["round2/search/search.md"] = normalized((run / "round2/search/search.md").read_text(), run)
    return out


@pytest.fixture()
def tiny(tmp_path):
    return tiny_workspace(tmp_path)


def test_pipeline_killed_in_each_stage_resumes_to_the_same_result(tiny):
    t = tiny
    ref = launch(t, t / "ref", "none")  # the uninterrupted run, beside the chain
    run, expect = t / "killed", None
    for point, said in KILLS + [("none", None)]:
        p = launch(t, run, point)
        log, _ = p.communicate(timeout=600)
        if expect is not None:  # this launch resumed what the previous kill left
            assert expect in log, (expect, log[-3000:])
        if point == "none":
            assert p.returncode == 0, log[-3000:]
            break
        assert p.returncode == -signal.SIGKILL, log[-3000:]
        inside(run, point)
        expect = said.format(run=run)
    log, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, log[-3000:]

    assert not ckpt.partials(run, recursive=True)
    # the timings of a resumed run cover every stage, whichever invocation ran it
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (t / "ref", run))
    assert list(sb["stage_seconds_all"]) == list(sa["stage_seconds_all"]) \
        == list(sa["stage_seconds"])
    assert len(sb["stage_seconds"]) < len(sa["stage_seconds"])  # the last invocation's share
    report = (run / "report.md").read_text()
    assert "in this invocation, which resumed a run" in report
    assert "| teacher correction |" in report  # a stage an earlier invocation ran
    a, b = results(t / "ref"), results(run)
    assert sorted(a) == sorted(b)
    assert {"teacher_correction/final/model-00001-of-00001.safetensors",
            "round1/hf/model.safetensors", "round2/hf/model.safetensors",
            "round2/search/chosen.json", "summary.json"} <= set(a)
    for k, v in a.items():
        if isinstance(v, dict) and v and all(isinstance(x, torch.Tensor) for x in v.values()):
            assert sorted(v) == sorted(b[k]), k
            assert all(torch.equal(v[n], b[k][n]) for n in v), k  # bit for bit
        else:
            assert v == b[k], k  # numbers exactly (the same floats)


def test_concurrent_writers_of_one_results_file(tmp_path):
    """The jobs of a search multirun write candidates.json and search.md at once: each write
    lands whole (no shared temporary name to lose), and a writer killed mid-way leaves a
    temporary file that the next run finds and removes."""
    import threading

    from nemo_minitron.artifacts.atomic import write_file as write_atomic
    from nemo_minitron.artifacts.atomic import write_text as write_text_atomic

    target, errors = tmp_path / "search.md", []

    def writer(i):
        try:
            for _ in range(50):
                write_text_atomic(target, f"job {i}\n" * 2000)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    jobs = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    assert errors == []
    lines = set(target.read_text().splitlines())
    assert len(lines) == 1 and target.read_text().count("\n") == 2000  # one writer's, whole

    class Killed(BaseException):
        pass

    def dies(tmp):
        tmp.write_text("half")
        raise Killed  # stands in for the process dying: nothing after it runs

    with pytest.raises(Killed):
        write_atomic(target, dies)
    assert not ckpt.partials(tmp_path)  # an exception cleans up after itself
    left = ckpt.partial_name(target)
    left.write_text("half")  # what a SIGKILL at that point leaves
    assert ckpt.partials(tmp_path) == [left]
    ckpt.remove_partials(ckpt.partials(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["search.md"]

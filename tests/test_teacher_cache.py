"""Offline teacher cache end to end on tiny models (issue 16): `minitron teacher_cache` writes the
top-k of exactly the samples a distillation reads; distilling from it follows online top-k
distillation (loss and gradient norm, fp32 round-off), resumes bitwise, and mismatches are refused
before any model is built, naming the field."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nemo_minitron import preflight
from nemo_minitron.config.schema import CacheConfig, KDConfig, TeacherCacheJob
from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.data.packed import PackedSequences, step_batches
from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.distill import teacher_cache as tc
from nemo_minitron.distill.trainer import run_distill

from tests.helpers import metrics, tiny_hf, tiny_tokenizer, torchrun
from tests.test_distill_run import models, one_thread  # noqa: F401 (the module fixture)
from tests.workers.distill_layouts import job as distill_job

K = 16


def _job(t, out, steps=3, **kd):
    j = distill_job(t / "student", str(t / "teacher"), str(t / "corpus"), str(t / out), 1, 1,
                    steps=steps)
    j.train.save_interval = 2
    j.kd = KDConfig(teacher=str(t / "teacher"), lm_weight=0.0, chunk_tokens=16, **kd)
    return j


@pytest.fixture(scope="module")
def cache(models):
    t = models
    d = _job(t, "unused")
    j = TeacherCacheJob(model=d.model, parallel=d.parallel, data=d.data, train=d.train,
                        kd=KDConfig(teacher=str(t / "teacher")),
                        cache=CacheConfig(k=K, dtype="fp32"), output=str(t / "tcache"))
    preflight.check("teacher_cache", j)
    other = tiny_hf("gqa", seed=1)  # another teacher of the same architecture and tokenizer
    ckpt.save(t / "teacher2", arch_from_hf_config(other.config), other.state_dict(),
              tokenizer=tiny_tokenizer())
    with one_thread():
        res = tc.build(j)
    return t / "tcache", res, j


def test_cache_holds_the_runs_samples(cache):
    path, res, j = cache
    data = PackedSequences(j.data.prefix, j.data.seq_length, valid_fraction=j.data.valid_fraction)
    for step in range(j.train.steps):  # what training reads at micro 2 x dp 2, rank by rank
        want = sorted(int(s) for r in (0, 1) for b in step_batches(
            data, step, 4, 2, seed=j.train.seed, dp_rank=r, dp_size=2,
            with_index=True) for s in b["sample"])
        shard = load_file(str(path / tc.shard_name(step)))
        assert sorted(shard["sample"].tolist()) == want
        assert shard["ids"].shape == (4, 32, K) and shard["ids"].dtype == torch.uint16
        total = shard["logp"].exp().sum(-1) + shard["log_rest"].exp()
        assert torch.allclose(total, torch.ones(()), atol=1e-5)
    tokens = j.train.steps * 4 * 32
    assert res["tokens"] == tokens
    # stored bytes: k ids + k logprobs + 1 rest, plus a small safetensors header per shard
    per = tc.bytes_per_token(K, "fp32", "uint16")  # the tiny vocabulary fits uint16 ids
    assert tc.read_manifest(path)["ids_dtype"] == "uint16" and per == 6 * K + 4
    assert tokens * per <= res["bytes"] < tokens * per + 3 * 1024
    # a rerun finds every shard and writes nothing
    before = {f.name: f.stat().st_mtime_ns for f in path.glob("step_*")}
    with one_thread():
        tc.build(j)
    assert {f.name: f.stat().st_mtime_ns for f in path.glob("step_*")} == before


def _rows_by_sample(path, step):
    shard = load_file(str(Path(path) / tc.shard_name(step)))
    return {s: {n: shard[n][i] for n in ("ids", "logp", "log_rest")}
            for i, s in enumerate(shard["sample"].tolist())}


def _as_int32_cache(path, out):
    """A copy of the cache at ``path`` as the format wrote it before uint16 ids."""
    shutil.copytree(path, out)
    for f in out.glob("step_*.safetensors"):
        rows = load_file(str(f))
        save_file(dict(rows, ids=rows["ids"].to(torch.int32)), str(f))
    m = tc.read_manifest(out)
    del m["ids_dtype"]
    (out / tc.MANIFEST).write_text(json.dumps(m))
    return out


@pytest.mark.multirank
def test_cached_follows_online_topk_and_resumes_bitwise(models, cache):
    t = models
    path = str(cache[0])
    with one_thread():
        run_distill(_job(t, "online", top_k=K))
        run_distill(_job(t, "cached", teacher_cache=path, cache_residual=False))
        run_distill(_job(t, "bucket", teacher_cache=path))
    online, cached = metrics(t / "online"), metrics(t / "cached")
    for key in ("loss", "kd", "grad_norm"):
        a, b = [r[key] for r in online if key in r], [r[key] for r in cached if key in r]
        assert len(a) == 3 and b == pytest.approx(a, rel=1e-5, abs=1e-7), key
    bucket = [r["kd"] for r in metrics(t / "bucket") if "kd" in r]
    assert len(bucket) == 3 and bucket[0] != pytest.approx(online[0]["kd"], rel=1e-3)
    # a cache written before uint16 ids (int32 ids, no ids_dtype in the manifest) gives the same
    # losses bit for bit, and resuming it keeps int32 for the new shards
    old = _as_int32_cache(path, t / "tcache_int32")
    with one_thread():
        run_distill(_job(t, "bucket_int32", teacher_cache=str(old)))
    for key in ("loss", "kd", "grad_norm"):
        assert [r[key] for r in metrics(t / "bucket_int32") if key in r] == \
            [r[key] for r in metrics(t / "bucket") if key in r], key
    (old / tc.shard_name(2)).unlink()
    with one_thread():
        tc.build(dataclasses.replace(cache[2], output=str(old)))
    assert load_file(str(old / tc.shard_name(2)))["ids"].dtype == torch.int32
    assert tc.read_manifest(old)["ids_dtype"] == "int32"
    # one 2-rank launch: builds at TP=2, PP=2, DP=2; distillations from the cache at PP=2, DP=2
    # and TP=2 (renormalised and bucket), and the TP=2 bucket run resumed from step 2
    out = t / "layouts"
    rows = {r["layout"]: r for r in torchrun("teacher_cache_layouts", 2, t / "student",
                                             t / "teacher", t / "corpus", path, out, K)}
    for name in ("tp2", "pp2", "dp2"):  # the same rows as the one-process build, per sample
        for step in range(3):
            want, got = _rows_by_sample(path, step), _rows_by_sample(out / f"build_{name}", step)
            assert got.keys() == want.keys(), (name, step)
            for s, w in want.items():
                assert torch.equal(got[s]["ids"], w["ids"]), (name, step, s)
                for n in ("logp", "log_rest"):
                    assert torch.allclose(got[s][n], w[n], rtol=1e-5, atol=1e-5), (name, step, n)
    ref = {"pp2": metrics(t / "bucket"), "dp2": metrics(t / "bucket"),
           "tp2_bucket": metrics(t / "bucket"), "tp2_renorm": online}
    for name, want_rows in ref.items():
        for key in ("loss", "kd", "grad_norm"):
            want = [r[key] for r in want_rows if key in r]
            assert rows[name][key] == pytest.approx(want, rel=1e-4, abs=1e-5), (name, key)
    # one 4-rank launch: TP=2 x PP=2 at once, the build and a distillation from the cache
    rows4 = {r["layout"]: r for r in torchrun("teacher_cache_layouts", 4, t / "student",
                                              t / "teacher", t / "corpus", path, out, K)}
    for step in range(3):
        want, got = _rows_by_sample(path, step), _rows_by_sample(out / "build_tp2pp2", step)
        assert got.keys() == want.keys() and all(
            torch.equal(got[s]["ids"], w["ids"]) and
            torch.allclose(got[s]["logp"], w["logp"], rtol=1e-5, atol=1e-5) for s, w in want.items())
    for key in ("loss", "kd", "grad_norm"):
        want = [r[key] for r in metrics(t / "bucket") if key in r]
        assert rows4["tp2pp2_bucket"][key] == pytest.approx(want, rel=1e-4, abs=1e-5), key
    # resume: the step-2 checkpoints, continued to step 3, give the same weights (TP=1, TP=2)
    shutil.copytree(t / "bucket", t / "bucket_resumed", ignore=shutil.ignore_patterns("final"))
    with one_thread():
        res = run_distill(_job(t, "bucket_resumed", teacher_cache=path))
    assert res["steps"] == 3
    for a_dir, b_dir in ((t / "bucket", t / "bucket_resumed"),
                         (out / "tp2_bucket", out / "tp2_bucket_resumed")):
        a = ckpt.Checkpoint(a_dir / "final").tensors()
        b = ckpt.Checkpoint(b_dir / "final").tensors()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), b_dir


@pytest.mark.parametrize("change, field", [
    (lambda j: dataclasses.replace(j, data=dataclasses.replace(j.data, seq_length=16)), "data.seq_length"),
    (lambda j: dataclasses.replace(j, train=dataclasses.replace(j.train, seed=7)), "train.seed"),
    (lambda j: dataclasses.replace(j, train=dataclasses.replace(j.train, global_batch_size=8)),
     "train.global_batch_size"),
    (lambda j: dataclasses.replace(j, train=dataclasses.replace(j.train, steps=5)), "train.steps"),
    (lambda j: dataclasses.replace(j, kd=dataclasses.replace(j.kd, temperature=2.0)), "kd.temperature"),
    (lambda j: dataclasses.replace(j, kd=dataclasses.replace(j.kd, top_k=K + 1)), "kd.top_k"),
    (lambda j: dataclasses.replace(j, kd=dataclasses.replace(j.kd, hidden_pairs=[[0, 1]])), "kd.hidden_pairs"),
    (lambda j: dataclasses.replace(j, kd=dataclasses.replace(j.kd, kind="reverse")), "kd.kind"),
    (lambda j: dataclasses.replace(j, kd=dataclasses.replace(j.kd, teacher=str(Path(j.kd.teacher).parent / "teacher2"))),
     "kd.teacher"),
])
def test_mismatch_refused_in_preflight(models, cache, change, field):
    j = change(_job(models, "refused", teacher_cache=str(cache[0])))
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        preflight.check("distill", j)
    assert not (models / "refused").exists()


def test_other_dataset_refused(models, cache, tmp_path):
    shutil.copy(models / "corpus.bin", tmp_path / "c.bin")
    shutil.copy(models / "corpus.idx", tmp_path / "c.idx")
    j = _job(models, "refused", teacher_cache=str(cache[0]))
    j = dataclasses.replace(j, data=dataclasses.replace(j.data, prefix=str(tmp_path / "c")))
    with pytest.raises(ValueError, match="data.prefix=.* is not the dataset"):
        preflight.check("distill", j)


def test_interrupted_cache_refused_then_finished(models, cache):
    path, _, j = cache
    part = models / "tcache_part"
    shutil.copytree(path, part)
    (part / tc.shard_name(1)).unlink()
    d = _job(models, "refused", teacher_cache=str(part))
    with pytest.raises(ValueError, match=tc.shard_name(1)):
        preflight.check("distill", d)
    with one_thread():
        tc.build(dataclasses.replace(j, output=str(part)))
    assert torch.equal(load_file(str(part / tc.shard_name(1)))["logp"],
                       load_file(str(path / tc.shard_name(1)))["logp"])
    preflight.check("distill", d)


def test_damaged_shard_refused_then_rewritten(models, cache):
    """A shard cut after it was written (a copy, a full disk) reads as missing: the distillation
    is refused naming it (it was a safetensors traceback once training began), the build
    writes it again (it counted the file as done), and a manifest without a field is named."""
    path, _, j = cache
    part = models / "tcache_cut"
    shutil.copytree(path, part)
    f = part / tc.shard_name(2)
    f.write_bytes(f.read_bytes()[:1000])
    assert not tc.shard_ok(f) and tc.shard_ok(part / tc.shard_name(1))
    assert not tc.complete(part, 3)
    d = _job(models, "refused", teacher_cache=str(part))
    with pytest.raises(ValueError, match=tc.shard_name(2) + ".*damaged"):
        preflight.check("distill", d)
    with one_thread():
        tc.build(dataclasses.replace(j, output=str(part)))
    assert torch.equal(load_file(str(f))["logp"], load_file(str(path / tc.shard_name(2)))["logp"])
    preflight.check("distill", d)
    m = json.loads((part / tc.MANIFEST).read_text())
    del m["teacher_fingerprint"]
    (part / tc.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match="lacks teacher_fingerprint: a damaged manifest"):
        preflight.check("distill", d)

"""The prepared GPU check (benchmarks/gpu_check.py) cannot rot: its --dry-run takes every code path
of the GPU run on the CPU (tiny configs, local spec) and its summary is checked here. The parts
that need a GPU must say "not applicable on CPU", never pass silently."""

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dry_run(gpu_check, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    gpu_check.main(["--dry-run", "--out", str(out)])
    return gpu_check, json.loads((out / "summary.json").read_text()), (out / "summary.md").read_text()


def finite_positive(*xs):
    return all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in xs)


def test_dry_run_summary(dry_run):
    mod, s, md = dry_run
    p = s["parts"]
    assert list(p) == ["env", "parity", "importance", "distill_bf16", "distill_fp8", "fp8_vs_bf16"]
    assert s["dry_run"] and s["wall_s"] > 0
    assert p["env"]["status"] == "ok" and finite_positive(p["env"]["bf16_matmul_tflops"])
    assert p["env"]["fp8_matmul_tflops"] == "not applicable on CPU"

    par = p["parity"]
    assert par["status"] == "ok", par
    assert par["spec_b"] == "local (TE not applicable on CPU)"
    assert math.isfinite(par["logits_rel_err"]) and par["logits_rel_err"] <= par["tolerance"]
    assert par["within_tolerance"] and par["top1_agreement"] == 1.0

    imp = p["importance"]
    assert imp["status"] == "ok", imp
    assert imp["all_equal"] and imp["min_overlap"] == 1.0 and imp["samples"] > 0
    assert set(imp["kept_equal"]) == {"hidden", "ffn", "heads", "groups", "layers"}

    kd = p["distill_bf16"]
    assert kd["status"] == "ok", kd
    assert finite_positive(kd["tokens_per_s"], kd["tflops"], kd["mfu_vs_bf16_matmul"],
                           kd["overhead"], kd["teacher_forward_s"], kd["student_step_s"],
                           kd["distill_step_s"], kd["peak_mem_gib"])
    sizes = mod.dry_sizes()
    n = lambda a: a.num_params(embeddings=False) + a.vocab_size * a.hidden_size
    assert kd["flops_per_token"] == 2 * n(sizes.teacher) + 6 * n(sizes.student)
    assert kd["curve_steps"] == sizes.curve_steps == len(kd["curve"])
    assert all(math.isfinite(x) and x > 0 for x in kd["curve"])

    for name in ("distill_fp8", "fp8_vs_bf16"):
        assert p[name]["status"].startswith("not applicable on CPU"), p[name]
    assert "| distill_bf16 | ok |" in md and "| bf16 |" in md


def test_gpu_sizes_fit_the_brief_and_the_budget(gpu_check):
    s = gpu_check.gpu_sizes()
    assert 2.8e9 < s.teacher.num_params() < 3.6e9 and 0.9e9 < s.student.num_params() < 1.4e9
    assert s.student.vocab_size == s.teacher.vocab_size
    assert sum(s.budgets.values()) <= 7.5 * 60  # parts' hard limits inside the 8-minute wall


def test_compare_curves(gpu_check):
    a = [4.0, 3.0, 2.0, 1.5, 1.0]
    same = gpu_check.compare_curves(a, list(a))
    assert same["tail_rel_gap"] == 0 and same["max_step_rel_gap"] == 0 and same["fp8_finite"]
    worse = gpu_check.compare_curves(a, [x * 1.1 for x in a] + [9.0])  # extra steps ignored
    assert worse["steps"] == 5 and worse["tail_rel_gap"] == pytest.approx(0.1)
    assert not gpu_check.compare_curves(a, [4.0, float("nan")])["fp8_finite"]


def test_parts_are_guarded(gpu_check):
    s = {"parts": {}}

    def fails(_deadline):
        raise RuntimeError("boom")

    def unavailable(_deadline):
        raise gpu_check.Unavailable("not available: no TE")

    gpu_check.run_part(s, "a", 5, fails)
    gpu_check.run_part(s, "b", 0.2, lambda _d: time.sleep(2) or {})
    gpu_check.run_part(s, "c", 5, unavailable)
    gpu_check.run_part(s, "d", 5, lambda d: {"left_s": d - time.perf_counter()})
    p = s["parts"]
    assert p["a"]["status"] == "failed: RuntimeError: boom" and "boom" in p["a"]["traceback"]
    assert p["b"]["status"].startswith("failed: OverBudget") and p["b"]["seconds"] < 1.5
    assert p["c"]["status"] == "not available: no TE"
    assert p["d"]["status"] == "ok" and 0 < p["d"]["left_s"] <= 5


def test_only_reruns_the_named_parts(gpu_check, tmp_path):
    s = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--only", "env"])
    assert s["parts"]["env"]["status"] == "ok"
    assert all(s["parts"][p]["status"] == "skipped (--only)" for p in gpu_check.PARTS[1:])
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--out", str(tmp_path), "--only", "envv"])


def test_a_gpu_without_transformer_engine_says_why(gpu_check, monkeypatch):
    """What the lent GPU machine (no TE) will answer for the TE spec and FP8 parts."""
    import torch

    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)  # absent on any host
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for what, fp8 in (("the TE spec", False), ("FP8", True)):
        with pytest.raises(gpu_check.Unavailable,
                           match=r"^not available: transformer_engine.pytorch does not import"):
            gpu_check.need_te(what, fp8=fp8)
    s = {"parts": {"distill_bf16": {"status": "ok"},
                   "distill_fp8": {"status": "not available: no TE"}}}
    with pytest.raises(gpu_check.Unavailable, match="^not available: no TE$"):
        gpu_check.part_curves(type("Ctx", (), {"summary": s})(), None)

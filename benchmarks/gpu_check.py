"""The prepared GPU check: Transformer Engine spec, FP8 distillation and MFU, one call, <= 8 min.

    python benchmarks/gpu_check.py --out $OUT             # one CUDA GPU (docs/benchmarks.md, "GPU check")
    python benchmarks/gpu_check.py --out DIR --dry-run    # CPU, tiny configs, local spec, seconds

Parts, each guarded and time-boxed: one that cannot run is reported "not available: <why>" (on the
CPU dry run "not applicable on CPU: <why>") or "failed: <error>", and the others still run.

  env         versions, device, the bf16 (and fp8) matmul rate measured in this run
  parity      logits of the TE spec vs the local spec, same random ~1B weights
  importance  kept sets (hidden, FFN, heads, groups, layers) from calibrating either spec
  distill_bf16, distill_fp8
              ~3B teacher -> ~1B student (random weights): a few hundred distillation steps on
              fixed random batches (the loss curve), then timed steps: tokens/s, TFLOP/s and MFU
              (2*N_teacher + 6*N_student FLOPs per token, N = non-embedding + output-layer
              parameters, against the bf16 matmul rate of `env`), peak memory, co-location
              overhead (distillation step / (teacher forward + student step))
  fp8_vs_bf16 the two loss curves compared step by step (same initial weights, same batches)

Everything goes through the project's runtime: models from an Arch (runtime.shard), weights moved
between specs through the canonical weight map, calibration hooks (importance), the distillation
pair and loss (distill.pair, distill.objective). Writes summary.json and summary.md under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]),  # run from a plain checkout
                str(Path(__file__).resolve().parent)]

# the paths above first, then (noqa: E402):
import megatron.core  # noqa: E402
from gpu_harness import (Unavailable, free_memory, matmul_tflops, median_time,  # noqa: E402
                         need_te, peak_memory, run_part, te_import_error)
from megatron.core.distributed import (DistributedDataParallel,  # noqa: E402
                                       DistributedDataParallelConfig)
from megatron.core.distributed.finalize_model_grads import finalize_model_grads  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from nemo_minitron.arch import Arch  # noqa: E402
from nemo_minitron.config.schema import KDConfig  # noqa: E402
from nemo_minitron.distill.objective import Objective, reduce_reports  # noqa: E402
from nemo_minitron.distill.pair import DistillPair  # noqa: E402
from nemo_minitron.importance.calibrate import batches_forward_loop, calibrate  # noqa: E402
from nemo_minitron.pruning.select import Targets, make_plan  # noqa: E402
from nemo_minitron.runtime import dist  # noqa: E402
from nemo_minitron.runtime.parallel import current  # noqa: E402
from nemo_minitron.runtime.forward import gather_logits, on_device, run_forward  # noqa: E402
from nemo_minitron.runtime.shard import build_shard, gather_canonical, load_state  # noqa: E402


PARTS = ("env", "parity", "importance", "distill_bf16", "distill_fp8", "fp8_vs_bf16")


# ------------------------------------------------------------------ sizes
@dataclass
class Sizes:
    teacher: Arch
    student: Arch
    seq: int
    mbs: int
    curve_steps: int  # the loss curve: this many steps per precision (cut short by the budget)
    timing_steps: int  # timed repetitions (median) after one warm-up
    calib_batches: int
    matmul_n: int
    dtype: str = "bf16"
    lr: float = 1e-4  # Adam on random weights without warm-up: keep the curves out of divergence
    budgets: dict = field(default_factory=dict)  # part -> seconds


def gpu_sizes() -> Sizes:
    """Llama-3.2-3B / -1B shapes (128k vocabulary, GQA), 2 x 2048 tokens per step."""
    common = dict(vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0,
                  tie_embeddings=True)
    teacher = Arch(28, 3072, 8192, 24, 8, 128, **common)
    student = Arch(16, 2048, 8192, 32, 8, 64, **common)
    return Sizes(teacher, student, seq=2048, mbs=2, curve_steps=300, timing_steps=10,
                 calib_batches=4, matmul_n=8192,
                 budgets={"env": 30, "parity": 75, "importance": 75, "distill_bf16": 130,
                          "distill_fp8": 130, "fp8_vs_bf16": 10})


def dry_sizes() -> Sizes:
    teacher = Arch(4, 128, 256, 4, 2, 32, vocab_size=512, max_position_embeddings=128)
    student = Arch(2, 64, 128, 4, 2, 16, vocab_size=512, max_position_embeddings=128)
    return Sizes(teacher, student, seq=32, mbs=2, curve_steps=4, timing_steps=2, calib_batches=2,
                 matmul_n=256,
                 budgets={"env": 30, "parity": 60, "importance": 60, "distill_bf16": 90,
                          "distill_fp8": 90, "fp8_vs_bf16": 10})


def compute_params(arch: Arch) -> int:
    """Parameters that cost 2 FLOPs per token forward: non-embedding ones + the output layer."""
    return arch.num_params(embeddings=False) + arch.vocab_size * arch.hidden_size


# ------------------------------------------------------------------ models and data
def random_batch(sizes: Sizes, vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (sizes.mbs, sizes.seq + 1), generator=g)
    return on_device({"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(),
                      "loss_mask": torch.ones(sizes.mbs, sizes.seq),
                      "position_ids": torch.arange(sizes.seq).expand(sizes.mbs, -1).contiguous()})


def canonical_weights(shard) -> dict:
    """This shard's weights under canonical names, copied to the CPU (spec-independent)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in gather_canonical(shard).items()}


def random_weights(arch: Arch, dtype: str, seed: int) -> dict:
    torch.manual_seed(seed)
    shard = build_shard(arch, dtype, use_te=False)
    weights = canonical_weights(shard)
    del shard
    free_memory()
    return weights


def stage_with(arch: Arch, weights: dict, dtype: str, use_te: bool, fp8: str | None = None):
    shard = build_shard(arch, dtype, use_te=use_te, init_weights=False, fp8=fp8)
    load_state(shard, weights.__getitem__)
    return shard


def logits_of(shard, batches: list[dict]) -> list[torch.Tensor]:
    vocab = shard.arch.vocab_size
    out = run_forward(shard, batches, lambda lg, _b: {"logits": gather_logits(lg, vocab).float()})
    return [o["logits"] for o in out]


# ------------------------------------------------------------------ parts
def part_env(ctx, _deadline) -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "megatron_core": megatron.core.__version__, "machine": platform.machine(),
           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "device": "cpu", "te": te_import_error() or "importable"}
    if torch.cuda.is_available():
        out.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   gpu_mem_gib=torch.cuda.get_device_properties(0).total_memory / 2 ** 30)
        with contextlib.suppress(Exception):
            import transformer_engine
            out["te_version"] = transformer_engine.__version__
    n = ctx.sizes.matmul_n
    out["matmul_n"] = n
    out["bf16_matmul_tflops"] = ctx.bf16_tflops = matmul_tflops(n)
    if torch.cuda.is_available():
        try:
            out["fp8_matmul_tflops"] = ctx.fp8_tflops = matmul_tflops(n, fp8=True)
        except Exception as e:  # noqa: BLE001 - an older GPU without FP8 tensor cores
            out["fp8_matmul_tflops"] = f"not available: {type(e).__name__}: {e}"
    else:
        out["fp8_matmul_tflops"] = "not applicable on CPU"
    return out


def spec_pair(ctx) -> tuple:
    """The local shard and the same weights in the TE spec (on CPU: the local spec again, so the
    dry run still exercises the weight round trip and every comparison)."""
    if torch.cuda.is_available():
        need_te("the TE spec")  # on a GPU, local vs local would prove nothing
    if ctx.spec_pair is None:
        s = ctx.sizes
        torch.manual_seed(1)
        local = build_shard(s.student, s.dtype, use_te=False)
        other = stage_with(s.student, canonical_weights(local), s.dtype, ctx.use_te)
        batches = [random_batch(s, s.student.vocab_size, seed=100 + i)
                   for i in range(s.calib_batches)]
        ctx.spec_pair = (local, other, batches)
    return ctx.spec_pair


def part_parity(ctx, _deadline) -> dict:
    local, other, batches = spec_pair(ctx)
    a, b = logits_of(local, batches[:1])[0], logits_of(other, batches[:1])[0]
    rel = float((b - a).norm() / a.norm())
    tol = 5e-2 if ctx.sizes.dtype == "bf16" else 1e-3
    return {"spec_a": "local", "spec_b": ctx.spec_b, "dtype": ctx.sizes.dtype,
            "params": ctx.sizes.student.num_params(), "logits_rel_err": rel,
            "logits_max_abs_err": float((b - a).abs().max()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "tolerance": tol, "within_tolerance": rel <= tol}


def part_importance(ctx, _deadline) -> dict:
    local, other, batches = spec_pair(ctx)
    arch = ctx.sizes.student
    targets = Targets(hidden_size=arch.hidden_size * 3 // 4,
                      ffn_hidden_size=arch.ffn_hidden_size // 2,
                      num_attention_heads=arch.num_attention_heads // 2,
                      num_query_groups=arch.num_query_groups // 2,
                      num_layers=arch.num_layers * 3 // 4)
    imps = [calibrate(st, batches_forward_loop(st, batches, None)) for st in (local, other)]
    plans = [make_plan(arch, imp, targets) for imp in imps]
    kept = {"hidden": [[p.hidden] for p in plans], "layers": [[p.layers] for p in plans]}
    for axis in ("ffn", "heads", "groups"):
        kept[axis] = [getattr(p, axis) for p in plans]
    overlap, equal = {}, {}
    for axis, (ka, kb) in kept.items():
        fr = [len(set(x) & set(y)) / len(x) for x, y in zip(ka, kb)]
        overlap[axis], equal[axis] = min(fr), all(set(x) == set(y) for x, y in zip(ka, kb))
    score_err = {axis: float((getattr(imps[1], axis) - getattr(imps[0], axis)).norm()
                             / getattr(imps[0], axis).norm())
                 for axis in ("hidden", "ffn", "heads", "block")}
    return {"spec_a": "local", "spec_b": ctx.spec_b, "targets": vars(targets),
            "samples": imps[0].meta["samples"], "kept_equal": equal, "kept_overlap": overlap,
            "score_rel_err": score_err, "all_equal": all(equal.values()),
            "min_overlap": min(overlap.values())}


def distill_run(ctx, deadline: float, fp8: str | None) -> dict:
    """Distill on fixed random batches (the curve), then time teacher forward, student step and
    distillation step; the weights start from the same random draw for bf16 and fp8."""
    s = ctx.sizes
    if ctx.weights is None:  # drawn once, so both precisions start from the same models
        ctx.weights = (random_weights(s.teacher, s.dtype, seed=2),
                       random_weights(s.student, s.dtype, seed=3))
    peak_memory(reset=True)
    teacher = stage_with(s.teacher, ctx.weights[0], s.dtype, ctx.use_te, fp8)
    student = stage_with(s.student, ctx.weights[1], s.dtype, ctx.use_te, fp8)
    ddp = DistributedDataParallel(student.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False), student.model)
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=s.lr, clip_grad=1.0, bf16=s.dtype == "bf16",
        params_dtype=student.config.params_dtype), [ddp])
    vocab = s.student.vocab_size
    specs = {"kd": Objective(KDConfig(logit_weight=1.0, lm_weight=0.0, chunk_tokens=1024), vocab),
             "lm": Objective(None, vocab)}  # the LM loss alone
    pairs = {"kd": DistillPair(ddp, teacher.model, s.student.hidden_size, s.teacher.hidden_size,
                               student.config, fused_output=specs["kd"].fused_output),
             "lm": DistillPair(ddp, None, s.student.hidden_size, 0, student.config)}
    par = current()  # tp=1: no vocabulary group
    for pair in pairs.values():
        pair.config.no_sync_func = ddp.no_sync
        pair.config.finalize_model_grads_func = \
            lambda _chunks, *a, **k: finalize_model_grads([ddp], *a, **k)
        pair.config.grad_scale_func = opt.scale_loss
    fwd_bwd = get_forward_backward_func()

    def train_step(kind: str, batch: dict) -> float:
        loss_func = specs[kind].loss_func

        def step(it, model):
            b = next(it)
            return (model(b["tokens"], b["position_ids"], None, b["loss_mask"]),
                    partial(loss_func, b))

        student.model.train()
        ddp.zero_grad_buffer()
        opt.zero_grad()
        reports = fwd_bwd(forward_step_func=step, data_iterator=iter([batch]), model=[pairs[kind]],
                          num_microbatches=1, seq_length=s.seq, micro_batch_size=s.mbs,
                          forward_only=False)
        opt.step()
        return reduce_reports(reports, par)["loss"]

    batch0 = random_batch(s, vocab, seed=0)
    timing_reserve = 3 * (s.timing_steps + 1) * ctx.step_estimate + 5
    curve, t0 = [], time.perf_counter()
    for i in range(s.curve_steps):
        curve.append(train_step("kd", random_batch(s, vocab, seed=1000 + i)))
        ctx.step_estimate = (time.perf_counter() - t0) / len(curve)
        if time.perf_counter() + ctx.step_estimate + timing_reserve > deadline:
            break  # keep time for the timed steps; the curve is compared over common steps

    def teacher_forward():
        with torch.no_grad():
            teacher.model.eval()
            teacher.model(batch0["tokens"], batch0["position_ids"], None)

    t_teacher = median_time(teacher_forward, s.timing_steps)
    t_student = median_time(lambda: train_step("lm", batch0), s.timing_steps)
    t_kd = median_time(lambda: train_step("kd", batch0), s.timing_steps)
    tokens = s.mbs * s.seq
    flops_tok = 2 * compute_params(s.teacher) + 6 * compute_params(s.student)
    tflops = flops_tok * tokens / t_kd / 1e12
    out = {"precision": fp8 or s.dtype, "spec": "te" if ctx.use_te else "local",
           "teacher_params": s.teacher.num_params(), "student_params": s.student.num_params(),
           "tokens_per_step": tokens, "flops_per_token": flops_tok,
           "teacher_forward_s": t_teacher, "student_step_s": t_student, "distill_step_s": t_kd,
           "tokens_per_s": tokens / t_kd, "tflops": tflops,
           "mfu_vs_bf16_matmul": tflops / ctx.bf16_tflops if ctx.bf16_tflops else None,
           "overhead": t_kd / (t_teacher + t_student),
           "curve_steps": len(curve), "curve": curve, "loss_first": curve[0], "loss_last": curve[-1],
           **peak_memory()}
    if fp8 and ctx.fp8_tflops:
        out["mfu_vs_fp8_matmul"] = tflops / ctx.fp8_tflops
    del pairs, opt, ddp, student, teacher
    return out


def part_distill(ctx, deadline, fp8: str | None) -> dict:
    if fp8:
        need_te("FP8 (TransformerConfig.fp8 acts only through TE modules)", fp8=True)
    return distill_run(ctx, deadline, fp8)


def compare_curves(a: list[float], b: list[float], tail: float = 0.2) -> dict:
    """FP8 (b) against bf16 (a) over the steps both ran: the relative gap of the mean loss over
    the last ``tail`` of them, the largest relative gap at any step, and whether b ever blew up."""
    n = min(len(a), len(b))
    if n == 0:
        raise ValueError("no common steps to compare")
    k = max(1, int(n * tail))
    ma, mb = statistics.fmean(a[n - k:n]), statistics.fmean(b[n - k:n])
    gaps = [abs(y - x) / max(abs(x), 1e-12) for x, y in zip(a[:n], b[:n])]
    return {"steps": n, "tail_steps": k, "bf16_tail_mean": ma, "fp8_tail_mean": mb,
            "tail_rel_gap": (mb - ma) / max(abs(ma), 1e-12), "max_step_rel_gap": max(gaps),
            "fp8_finite": all(math.isfinite(y) for y in b[:n])}


def part_curves(ctx, _deadline) -> dict:
    parts = ctx.summary["parts"]
    for name in ("distill_bf16", "distill_fp8"):
        st = parts.get(name, {}).get("status", "did not run")
        if st != "ok":
            raise Unavailable(st if st.startswith("not ") else f"not available: {name} {st}")
    cmp = compare_curves(parts["distill_bf16"]["curve"], parts["distill_fp8"]["curve"])
    cmp["fp8_speedup"] = parts["distill_bf16"]["distill_step_s"] / parts["distill_fp8"]["distill_step_s"]
    return cmp


# ------------------------------------------------------------------ summary
class Context:
    def __init__(self, sizes: Sizes, summary: dict):
        self.sizes, self.summary = sizes, summary
        self.use_te = torch.cuda.is_available() and te_import_error() is None
        self.spec_b = "te" if self.use_te else "local (TE not applicable on CPU)"
        self.bf16_tflops = self.fp8_tflops = None
        self.spec_pair = self.weights = None
        self.step_estimate = 0.0


def markdown(summary: dict) -> str:
    lines = [f"# GPU check ({'dry run, CPU' if summary['dry_run'] else 'GPU'})", "",
             f"`{summary['command']}` — {summary['date']}, {summary['wall_s']:.0f} s wall", "",
             "| part | status | s |", "|---|---|---|"]
    for name, e in summary["parts"].items():
        lines.append(f"| {name} | {e['status']} | {e['seconds']} |")
    p = summary["parts"]
    env = p.get("env", {})
    fp8_rate = env.get("fp8_matmul_tflops")
    lines += ["", f"Device {env.get('device')}, torch {env.get('torch')}, megatron-core "
              f"{env.get('megatron_core')}, TE: {env.get('te_version', env.get('te'))}; matmul "
              f"(n={env.get('matmul_n')}) bf16 {fmt(env.get('bf16_matmul_tflops'))} TFLOP/s, fp8 "
              + (f"{fmt(fp8_rate)} TFLOP/s." if isinstance(fp8_rate, float) else f"{fp8_rate}.")]
    if p.get("parity", {}).get("status") == "ok":
        e = p["parity"]
        lines.append(f"Parity {e['spec_a']} vs {e['spec_b']} ({e['dtype']}): logits rel err "
                     f"{fmt(e['logits_rel_err'])} (tolerance {e['tolerance']}), top-1 agreement "
                     f"{fmt(e['top1_agreement'])}.")
    if p.get("importance", {}).get("status") == "ok":
        e = p["importance"]
        lines.append(f"Importance {e['spec_a']} vs {e['spec_b']}: kept sets equal "
                     f"{e['kept_equal']}, min overlap {fmt(e['min_overlap'])}.")
    rows = [p[k] for k in ("distill_bf16", "distill_fp8") if p.get(k, {}).get("status") == "ok"]
    if rows:
        lines += ["", "| precision | tokens/s | TFLOP/s | MFU (bf16 matmul) | teacher fwd s | "
                  "student step s | KD step s | overhead | peak GiB | loss first → last (steps) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for e in rows:
            lines.append(f"| {e['precision']} | {e['tokens_per_s']:.0f} | {fmt(e['tflops'])} | "
                         f"{fmt(e['mfu_vs_bf16_matmul'])} | {fmt(e['teacher_forward_s'])} | "
                         f"{fmt(e['student_step_s'])} | {fmt(e['distill_step_s'])} | "
                         f"{fmt(e['overhead'])} | {fmt(e['peak_mem_gib'])} | "
                         f"{fmt(e['loss_first'])} → {fmt(e['loss_last'])} ({e['curve_steps']}) |")
    if p.get("fp8_vs_bf16", {}).get("status") == "ok":
        e = p["fp8_vs_bf16"]
        lines.append(f"\nFP8 vs bf16 over {e['steps']} steps: tail loss gap "
                     f"{fmt(e['tail_rel_gap'])}, largest step gap {fmt(e['max_step_rel_gap'])}, "
                     f"FP8 speed-up {fmt(e['fp8_speedup'])}.")
    return "\n".join(lines) + "\n"


def fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for summary.json and summary.md")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny configs, local spec, a few steps: every code path but the GPU's")
    ap.add_argument("--curve-steps", type=int, help="distillation steps per precision")
    ap.add_argument("--only", help="comma-separated parts to run (a rerun of the ones that "
                    f"failed); default all: {','.join(PARTS)}")
    args = ap.parse_args(argv)
    if args.dry_run:  # the CPU check on any host (a GPU host hides its GPUs from this process)
        os.environ.setdefault(dist.DEVICE_ENV, "cpu")
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA GPU here; use --dry-run for the CPU check")
    sizes = dry_sizes() if args.dry_run else gpu_sizes()
    if args.curve_steps:
        sizes.curve_steps = args.curve_steps
    only = set(args.only.split(",")) if args.only else set(PARTS)
    if only - set(PARTS):
        ap.error(f"--only: unknown parts {sorted(only - set(PARTS))}; choose from {PARTS}")

    t0 = time.perf_counter()
    summary = {"command": " ".join(["python benchmarks/gpu_check.py", *(argv or sys.argv[1:])]),
               "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "dry_run": args.dry_run, "parts": {}}
    dist.init(1, 1)
    try:
        ctx = Context(sizes, summary)
        fns = {"env": part_env, "parity": part_parity, "importance": part_importance,
               "distill_bf16": partial(part_distill, fp8=None),
               "distill_fp8": partial(part_distill, fp8="hybrid"), "fp8_vs_bf16": part_curves}
        for name in PARTS:
            if name == "distill_bf16":  # the ~1B spec pair is done with: free it for 3B + 1B
                ctx.spec_pair = None
                free_memory()
            if name in only:
                run_part(summary, name, sizes.budgets[name], partial(fns[name], ctx))
            else:
                summary["parts"][name] = {"status": "skipped (--only)", "seconds": 0.0}
    finally:
        dist.release()
    summary["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    md = markdown(summary)
    (out / "summary.md").write_text(md)
    print(md, flush=True)
    return summary


if __name__ == "__main__":
    main()

"""Distillation step cost: teacher forward, student training step and distillation step, in fp32
and bf16 back to back in one process, next to a plain `transformers` KD loop on the same models,
batch and threads.

    python benchmarks/distill_step.py [--student PATH] [--steps 3] [--mbs 4] [--seq 256]
                                      [--dtypes fp32,bf16] [--no-hf] [--profile DIR]
                                      [--phases]

Default student: SmolLM2-135M width-pruned to ~68M (made here with random importance if no
--student is given; speed does not depend on the weights). One process.

Ours: megatron-core models as the training loop builds them (bf16 = bf16 weights with fp32 main
weights and grads in megatron's optimizer, as on GPUs), the chunked logit KL with both output
layers folded into its chunks (kd.fused_output; --kd-output logits|both for the materialised
logits path). Plain: the
exported Hugging Face models, teacher forward under no_grad, student forward, full-vocabulary
KL in fp32, torch AdamW on the student's parameters (in bf16 they are bf16 and there are no
fp32 main weights: less work than ours, which keeps them).
FLOPs per token: 2*N_teacher (forward) + 6*N_student (forward+backward), N = non-embedding params
plus the output layer. --profile DIR writes torch.profiler tables of one distillation step of
each loop and dtype.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from functools import partial

import torch
import torch.nn.functional as F


def interleaved(runners: dict, steps: int, clock=time.perf_counter) -> dict:
    """Best time of every (runner, phase) over ``steps`` rounds, each round running every
    configuration once in turn: on a shared machine, whose load drifts over minutes, the
    configurations then see the same conditions and their ratios stay meaningful. ``clock``
    ``time.process_time`` counts this process's CPU seconds instead (all threads): a process
    that waits for a core is not charged, so figures taken under heavy load stay comparable."""
    for fns in runners.values():  # warm-up
        for fn in fns.values():
            fn()
    times = {(key, ph): [] for key, fns in runners.items() for ph in fns}
    for r in range(steps):
        for key, fns in runners.items():
            for ph, fn in fns.items():
                t = clock()
                fn()
                times[(key, ph)].append(clock() - t)
        print(f"round {r + 1}/{steps} done (load {os.getloadavg()[0]:.2f})", flush=True)
    out = {key: {ph: min(times[(key, ph)]) for ph in fns} for key, fns in runners.items()}
    return out


def phase_times(phased: dict, whole: dict, steps: int) -> dict:
    """Best time of each phase over ``steps`` rounds (after a warm-up), configurations in turn,
    each round also timing the whole step (``whole``: key -> the KD step) as a check on the
    split: their sum should be close to it."""
    for fn in phased.values():
        fn()
    best = {}
    for _ in range(steps):
        for key, fn in phased.items():
            t = time.perf_counter()
            whole[key]()
            t = time.perf_counter() - t
            times = {**fn(), "whole step": t}
            for ph, t in times.items():
                best.setdefault(key, {})[ph] = min(t, best.get(key, {}).get(ph, t))
    return best


def profile_table(fn, path: str) -> None:
    """A torch.profiler table of one call of ``fn`` (after one warm-up call), by op and by shape.
    Read with care: under the profiler the copies and elementwise ops on large temporaries (the
    logit chunks) run 10-20x slower than outside it, which inflates their share
    (docs/benchmarks.md, "Back on an AVX512-BF16 EPYC")."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
        f.write("\n\nby input shape\n")
        f.write(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=40))
    print(f"profile: {path}")


def ours(teacher_path, student_path, batch, args, dtype: str, profile_dir=None,
         fused: bool = True) -> dict:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_minitron.config.schema import KDConfig
    from nemo_minitron.distill.objective import Objective
    from nemo_minitron.distill.pair import DistillPair
    from nemo_minitron.runtime.adam import use_fused_adam
    from nemo_minitron.runtime.shard import load_checkpoint

    teacher, _ = load_checkpoint(teacher_path, dtype)
    student, _ = load_checkpoint(student_path, dtype)
    ddp = DistributedDataParallel(student.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True), student.model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, bf16=dtype == "bf16",
                                                 params_dtype=student.config.params_dtype), [ddp])
    use_fused_adam(opt)  # as the trainer does
    vocab = student.arch.vocab_size

    def run(pair, objective):
        loss_func = objective.loss_func

        def step(it, model):
            b = next(it)
            return model(b["tokens"], b["position_ids"], None), partial(loss_func, b)

        cfg = pair.config
        cfg.no_sync_func, cfg.finalize_model_grads_func = ddp.no_sync, None
        return get_forward_backward_func()(forward_step_func=step, data_iterator=iter([batch]),
                                           model=[pair], num_microbatches=1, seq_length=args.seq,
                                           micro_batch_size=args.mbs, forward_only=False)

    kd_objective = Objective(KDConfig(logit_weight=1.0, lm_weight=0.0, chunk_tokens=args.chunk,
                                      fused_output=fused), vocab)
    kd_pair = DistillPair(ddp, teacher.model, student.arch.hidden_size, teacher.arch.hidden_size,
                          student.config, fused_output=kd_objective.fused_output)
    lm_pair = DistillPair(ddp, None, student.arch.hidden_size, 0, student.config)
    lm_objective = Objective(None, vocab)  # the LM loss alone

    def teacher_forward():
        with torch.no_grad():
            teacher.model.eval()
            teacher.model(batch["tokens"], batch["position_ids"], None)

    def student_step():
        ddp.zero_grad_buffer(); opt.zero_grad(); run(lm_pair, lm_objective); opt.step()

    def distill_step():
        ddp.zero_grad_buffer(); opt.zero_grad(); run(kd_pair, kd_objective); opt.step()

    def distill_phases() -> dict:
        """One KD step by phase (the same work as ``distill_step``, called directly instead of
        through megatron's schedule): both forwards and the loss, whose fused output-layer KL
        also makes the logits' gradients; the backward through the student, which accumulates
        into the fp32 gradient buffer; the optimizer step."""
        t0 = time.perf_counter()
        ddp.zero_grad_buffer(); opt.zero_grad()
        t1 = time.perf_counter()
        total = kd_objective.loss_func(batch, kd_pair(batch["tokens"], batch["position_ids"],
                                                      None))[0]
        t2 = time.perf_counter()
        total.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        return {"zero grads": t1 - t0, "forward + loss": t2 - t1, "backward": t3 - t2,
                "optimizer": t4 - t3}

    out = {"teacher": teacher_forward, "student": student_step, "kd": distill_step,
           "phases": distill_phases}
    if profile_dir:
        profile_table(distill_step, os.path.join(
            profile_dir, f"distill_step_{dtype}{'' if fused else '_logits'}.txt"))
    out["arch"] = (teacher.arch, student.arch)
    return out


def plain(teacher_hf, student_hf, batch, args, dtype: str, profile_dir=None) -> dict:
    """The textbook loop: what a user would write with transformers alone."""
    from transformers import AutoModelForCausalLM

    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    teacher = AutoModelForCausalLM.from_pretrained(teacher_hf, dtype=dt).eval()
    student = AutoModelForCausalLM.from_pretrained(student_hf, dtype=dt).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    tokens = batch["tokens"]

    def teacher_forward():
        with torch.no_grad():
            return teacher(tokens).logits

    def student_step():
        opt.zero_grad(set_to_none=True)
        out = student(tokens, labels=tokens)
        out.loss.backward()
        opt.step()

    def distill_step():
        opt.zero_grad(set_to_none=True)
        t = teacher_forward()
        s = student(tokens).logits
        v = s.size(-1)
        loss = F.kl_div(F.log_softmax(s.float().view(-1, v), -1),
                        F.log_softmax(t.float().view(-1, v), -1), log_target=True,
                        reduction="batchmean")
        loss.backward()
        opt.step()

    if profile_dir:
        profile_table(distill_step, os.path.join(profile_dir, f"distill_step_plain_{dtype}.txt"))
    return {"teacher": teacher_forward, "student": student_step, "kd": distill_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=256, help="kd.chunk_tokens (default: the config's)")
    ap.add_argument("--malloc", choices=("keep", "default"), default="keep",
                    help="keep: freed host memory reused, as `minitron` sets it "
                         "(nemo_minitron/runtime/host_alloc.py), for both loops; default: glibc's")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--no-hf", action="store_true", help="skip the plain transformers loop")
    ap.add_argument("--kd-output", choices=("fused", "logits", "both"), default="fused",
                    help="our logit loss with the output layers folded into its chunks "
                         "(kd.fused_output=true, the default), on materialised logits, or both "
                         "(the latter as 'logits' rows)")
    ap.add_argument("--profile", help="directory for torch.profiler tables of the KD steps")
    ap.add_argument("--phases", action="store_true",
                    help="also time our KD step by phase (forward + loss, backward, optimizer), "
                         "each dtype in turn, best of --steps rounds")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU seconds, robust to load (with 1 thread: spinning "
                         "OpenMP threads count as busy)")
    args = ap.parse_args()
    if args.malloc == "default":
        os.environ["NEMO_MINITRON_MALLOC"] = "default"
    from nemo_minitron.runtime.host_alloc import keep_freed_memory

    malloc = keep_freed_memory()

    from nemo_minitron import demo
    from nemo_minitron.convert import checkpoint as ckpt
    from nemo_minitron.convert.hf import export_hf
    from nemo_minitron.data.packed import PackedSequences
    from nemo_minitron.pruning.apply import apply_plan
    from nemo_minitron.pruning.select import Targets, make_plan, random_importance
    from nemo_minitron.runtime import dist

    tmp = tempfile.mkdtemp()
    teacher_path = demo.checkpoint_dir()
    student_path = args.student
    if student_path is None:
        t = ckpt.Checkpoint(teacher_path)
        plan = make_plan(t.arch, random_importance(t.arch, 0),
                         Targets(hidden_size=384, ffn_hidden_size=1024, num_attention_heads=6))
        student_path = tmp + "/student"
        ckpt.save(student_path, plan.target, apply_plan(plan, t.get))
    data = PackedSequences(demo.dataset_prefix(), args.seq, split="train")
    batch = next(data.batches(args.mbs, num_batches=1))
    tokens = args.mbs * args.seq
    dtypes = args.dtypes.split(",")

    runners, phased, phases = {}, {}, {}
    dist.init(1, 1)
    try:
        archs = None
        variants = {"fused": [("ours", True)], "logits": [("ours", False)],
                    "both": [("ours", True), ("logits", False)]}[args.kd_output]
        for dt in dtypes:
            for who, fused in variants:
                runners[(who, dt)] = r = ours(teacher_path, student_path, batch, args, dt,
                                              args.profile, fused)
                archs = r.pop("arch")
                phased[(who, dt)] = r.pop("phases")
        if not args.no_hf:
            export_hf(teacher_path, tmp + "/teacher_hf")
            export_hf(student_path, tmp + "/student_hf")
            for dt in dtypes:
                runners[("plain", dt)] = plain(tmp + "/teacher_hf", tmp + "/student_hf", batch,
                                               args, dt, args.profile)
        results = interleaved(runners, args.steps,
                              time.process_time if args.clock == "cpu" else time.perf_counter)
        if args.phases:
            phases = phase_times(phased, {k: runners[k]["kd"] for k in phased}, args.steps)
    finally:
        dist.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)  # an exported teacher and student: ~0.8 GB

    ta, sa = archs

    def n_compute(arch):  # non-embedding parameters + the output layer's matmul
        return arch.num_params(embeddings=False) + arch.vocab_size * arch.hidden_size

    flops = (2 * n_compute(ta) + 6 * n_compute(sa)) * tokens
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load {os.getloadavg()[0]:.2f}, "
          f"freed host memory {malloc}")
    print(f"teacher {ta.num_params() / 1e6:.1f}M -> student {sa.num_params() / 1e6:.1f}M, "
          f"{args.mbs} x {args.seq} tokens, best of {args.steps}, {args.clock} clock")
    print(f"{'loop':6s} {'dtype':5s} {'teacher fwd':>12s} {'student step':>13s} {'KD step':>9s} "
          f"{'KD tok/s':>9s} {'GFLOP/s':>8s} {'overhead':>9s}")
    for (who, dt), r in results.items():
        print(f"{who:6s} {dt:5s} {r['teacher']:11.2f}s {r['student']:12.2f}s {r['kd']:8.2f}s "
              f"{tokens / r['kd']:9.0f} {flops / r['kd'] / 1e9:8.1f} "
              f"{r['kd'] / (r['teacher'] + r['student']):9.3f}")
    for who in ("ours", "logits", "plain"):
        if (who, "fp32") in results and (who, "bf16") in results:
            f, b = results[(who, "fp32")], results[(who, "bf16")]
            print(f"{who}: bf16 speed-up  teacher {f['teacher'] / b['teacher']:.2f}x, student "
                  f"{f['student'] / b['student']:.2f}x, KD step {f['kd'] / b['kd']:.2f}x "
                  "(goal >= 2.5x)")
    for (who, dt), ph in phases.items():
        whole = ph.pop("whole step")
        print(f"{who} {dt} KD step by phase: " + ", ".join(f"{k} {v:.3f}s" for k, v in ph.items())
              + f" (sum {sum(ph.values()):.3f}s; the whole step in the same rounds {whole:.3f}s)")
    for dt in dtypes:
        if ("logits", dt) in results:
            print(f"{dt}: fused output layer vs materialised logits, KD step "
                  f"{results[('logits', dt)]['kd'] / results[('ours', dt)]['kd']:.2f}x")
        if ("plain", dt) in results:
            print(f"{dt}: ours vs plain transformers KD step "
                  f"{results[('plain', dt)]['kd'] / results[('ours', dt)]['kd']:.2f}x (goal >= 1.2x)")


if __name__ == "__main__":
    main()

"""Cost of co-locating teacher and student: a distillation step against a teacher forward plus
a student training step run alone, with tokens/s and MFU-style FLOP accounting.

    python benchmarks/distill_step.py [--student PATH] [--steps 3] [--mbs 4] [--seq 256]

Default student: SmolLM2-135M width-pruned to ~68M (made here with random importance if no
--student is given; speed does not depend on the weights). fp32, one process.
FLOPs per token: 2*N_teacher (forward) + 6*N_student (forward+backward), N = non-embedding params
plus the output layer.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from functools import partial

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=128)
    args = ap.parse_args()

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_minitron import defaults
    from nemo_minitron.convert import checkpoint as ckpt
    from nemo_minitron.data.packed import PackedSequences
    from nemo_minitron.distill.loop import LossSpec, make_loss_func
    from nemo_minitron.distill.pair import DistillPair
    from nemo_minitron.pruning.apply import apply_plan
    from nemo_minitron.pruning.select import Targets, make_plan, random_importance
    from nemo_minitron.runtime import dist
    from nemo_minitron.runtime.stage import load_checkpoint

    teacher_path = defaults.checkpoint_dir()
    student_path = args.student
    if student_path is None:
        t = ckpt.Checkpoint(teacher_path)
        plan = make_plan(t.arch, random_importance(t.arch, 0),
                         Targets(hidden_size=384, ffn_hidden_size=1024, num_attention_heads=6))
        student_path = tempfile.mkdtemp() + "/student"
        ckpt.save(student_path, plan.target, apply_plan(plan, t.get))
    dist.init(1, 1)
    teacher, _ = load_checkpoint(teacher_path)
    student, _ = load_checkpoint(student_path)
    ddp = DistributedDataParallel(student.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True), student.model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, bf16=False,
                                                 params_dtype=torch.float32), [ddp])
    data = PackedSequences(defaults.dataset_prefix(), args.seq, split="train")
    batch = next(data.batches(args.mbs, num_batches=1))
    vocab = student.arch.vocab_size

    def run(pair, spec, forward_only=False):
        loss_func = make_loss_func(spec)

        def step(it, model):
            b = next(it)
            return model(b["tokens"], b["position_ids"], None), partial(loss_func, b)

        cfg = pair.config
        cfg.no_sync_func, cfg.finalize_model_grads_func = ddp.no_sync, None
        return get_forward_backward_func()(forward_step_func=step, data_iterator=iter([batch]),
                                           model=[pair], num_microbatches=1, seq_length=args.seq,
                                           micro_batch_size=args.mbs, forward_only=forward_only)

    kd_pair = DistillPair(ddp, teacher.model, student.arch.hidden_size, teacher.arch.hidden_size,
                          student.config)
    lm_pair = DistillPair(ddp, None, student.arch.hidden_size, 0, student.config)
    kd_spec = LossSpec(vocab_size=vocab, logit_weight=1.0, lm_weight=0.0, chunk_tokens=args.chunk)
    lm_spec = LossSpec(vocab_size=vocab, logit_weight=0.0, lm_weight=1.0, chunk_tokens=args.chunk)

    def teacher_forward():
        with torch.no_grad():
            teacher.model.eval()
            teacher.model(batch["tokens"], batch["position_ids"], None)

    def student_step():
        ddp.zero_grad_buffer(); opt.zero_grad(); run(lm_pair, lm_spec); opt.step()

    def distill_step():
        ddp.zero_grad_buffer(); opt.zero_grad(); run(kd_pair, kd_spec); opt.step()

    def best(fn):
        fn()  # warm-up
        ts = []
        for _ in range(args.steps):
            t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
        return min(ts)

    t_teacher, t_student, t_kd = best(teacher_forward), best(student_step), best(distill_step)
    tokens = args.mbs * args.seq

    def n_compute(arch):  # non-embedding parameters + the output layer's matmul
        return arch.num_params(embeddings=False) + arch.vocab_size * arch.hidden_size

    flops = (2 * n_compute(teacher.arch) + 6 * n_compute(student.arch)) * tokens
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"teacher {teacher.arch.num_params() / 1e6:.1f}M -> student "
          f"{student.arch.num_params() / 1e6:.1f}M, {args.mbs} x {args.seq} tokens, fp32")
    print(f"teacher forward      {t_teacher:6.2f} s")
    print(f"student train step   {t_student:6.2f} s")
    print(f"distillation step    {t_kd:6.2f} s  ({tokens / t_kd:.0f} tokens/s, "
          f"{flops / t_kd / 1e9:.1f} GFLOP/s)")
    print(f"co-location overhead {t_kd / (t_teacher + t_student):6.3f}  (target <= 1.10)")
    dist.shutdown()


if __name__ == "__main__":
    main()

"""The training loop shared by distillation and teacher correction, on megatron-core machinery.

megatron-core supplies the pieces: DDP gradient buffers, its optimizer (Adam, clipping), the
cosine-with-warm-up scheduler and the pipeline schedules (micro-batch accumulation, p2p). A step
consumes ``global_batch_size`` samples: each data-parallel rank runs ``global_batch_size /
(micro_batch_size * dp)`` micro-batches through ``DistillPair`` (student alone when there is no
teacher). The loss is averaged per token within a micro-batch and over micro-batches and ranks.
Intermediate hidden-state / embedding losses (``job.kd.hidden_pairs`` or ``auto_hidden_pairs``,
``embedding_weight``) are computed on the pipeline stage that holds a pair's later layer
(:mod:`.intermediate`); the optimizer may be megatron-core's distributed one (``train.
distributed_optimizer``), its checkpoints independent of the DP size (:mod:`.optim_state`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass
class LossSpec:
    """What the last pipeline stage computes from (student, teacher) logits."""

    vocab_size: int
    logit_weight: float = 0.0
    lm_weight: float = 1.0
    temperature: float = 1.0
    kind: str = "forward"
    top_k: int | None = None
    chunk_tokens: int | None = None
    cached: bool = False  # teacher top-k come with the batch (kd.teacher_cache), no teacher output
    cache_residual: bool = True


def make_loss_func(spec: LossSpec):
    from megatron.core import parallel_state as ps

    from . import losses as L

    def loss_func(batch, output):
        tp_group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
        student, teacher, extra = (output + (None,) * 3)[:3] if isinstance(output, tuple) \
            else (output, None, None)
        mask = batch["loss_mask"].float()
        total = student.new_zeros((), dtype=torch.float32)
        report = {}
        ntok = mask.sum()
        has_teacher = teacher is not None or spec.cached
        if spec.logit_weight and spec.cached:
            kd_sum, _ = L.cached_topk_kl(student, batch["cache_ids"], batch["cache_logp"],
                                         batch["cache_rest"], temperature=spec.temperature,
                                         mask=mask, vocab_size=spec.vocab_size,
                                         residual=spec.cache_residual, chunk_tokens=spec.chunk_tokens)
            total = total + spec.logit_weight * kd_sum
            report["kd"] = torch.stack([kd_sum.detach().float(), ntok])
        elif spec.logit_weight and teacher is not None:
            kd_sum, _ = L.logits_kl(student, teacher, temperature=spec.temperature, mask=mask,
                                    tp_group=tp_group, vocab_size=spec.vocab_size,
                                    top_k=spec.top_k, kind=spec.kind, chunk_tokens=spec.chunk_tokens)
            total = total + spec.logit_weight * kd_sum
            report["kd"] = torch.stack([kd_sum.detach().float(), ntok])
        if spec.lm_weight or not has_teacher:
            lm_sum, _ = L.lm_loss(student, batch["labels"], mask=mask, tp_group=tp_group,
                                  vocab_size=spec.vocab_size)
            total = total + (spec.lm_weight if has_teacher else 1.0) * lm_sum
            report["lm"] = torch.stack([lm_sum.detach().float(), ntok])
        report["loss"] = torch.stack([total.detach().float(), ntok])
        if extra is not None:  # this stage's weighted intermediate losses (reported separately)
            total = total + extra
        return total, ntok.int(), report

    return loss_func


def reduce_reports(reports: list[dict], stage_sums: dict[str, float] | None = None) -> dict[str, float]:
    """Token-weighted means of the last stage's reports, the same on every rank.

    ``stage_sums``: name -> this rank's token sum of a loss computed on any pipeline stage (the
    intermediate losses); summed over all stages and data-parallel replicas (TP rank 0 counts,
    the others hold copies) and divided by the last stage's token count. Every rank passes the
    same names.
    """
    from megatron.core import parallel_state as ps

    from ..runtime.forward import all_reduce_sum, sum_from_last_stage

    names = ["loss", "kd", "lm"]

    def fill(t):
        for r in reports:
            for i, n in enumerate(names):
                if n in r:
                    t[i] += r[n].detach().double().cpu()

    t = sum_from_last_stage(fill, (len(names), 2))
    out = {n: (t[i, 0] / t[i, 1]).item() for i, n in enumerate(names) if t[i, 1] > 0}
    if stage_sums:
        keys = sorted(stage_sums)
        s = all_reduce_sum(torch.tensor(
            [stage_sums[k] if ps.get_tensor_model_parallel_rank() == 0 else 0.0 for k in keys],
            dtype=torch.float64))
        out.update({k: (v / t[0, 1]).item() for k, v in zip(keys, s) if t[0, 1] > 0})
    return out


class Logger:
    """One line per interval on rank 0, metrics.jsonl, and TensorBoard / W&B when available."""

    def __init__(self, run_dir: Path, tensorboard: bool, wandb_project: str | None, config: dict):
        from ..runtime.dist import is_rank0

        self.on = is_rank0()
        self.file = open(run_dir / "metrics.jsonl", "a") if self.on else None
        self.tb = self.wb = None
        if self.on and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                log.info("tensorboard not installed: scalars go to metrics.jsonl only")
        if self.on and wandb_project:
            import wandb

            self.wb = wandb.init(project=wandb_project, config=config, dir=str(run_dir))

    def write(self, step: int, metrics: dict) -> None:
        if not self.on:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                if self.tb:
                    self.tb.add_scalar(k, v, step)
        if self.wb:
            self.wb.log(metrics, step=step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
        if self.wb:
            self.wb.finish()


def train(job, teacher_path: str | None, spec_overrides: dict, stage_name: str) -> dict:
    """Run (or resume) training; writes checkpoints and the final student under job.output."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ..convert.checkpoint import Checkpoint
    from ..data.packed import PackedSequences, step_batches
    from ..evaluate.loss import validation_loss
    from ..runtime import dist
    from ..runtime.forward import on_device
    from ..runtime.stage import load_checkpoint, save_checkpoint
    from ..runtime.routing import RoutingMonitor
    from . import intermediate as inter_mod
    from . import run_dir as run_dir_mod
    from . import train_state
    from .guard import Guard
    from .layer_map import auto_pairs
    from .losses import check_vocab
    from .pair import DistillPair

    tr, par = job.train, job.parallel
    run_dir = Path(job.output)
    # --- checks before any model is loaded
    student_ck = Checkpoint(job.model.checkpoint)
    student_ck.arch.check_parallel(par.tp, par.pp)
    teacher_ck = None
    if teacher_path:
        teacher_ck = Checkpoint(teacher_path)
        teacher_ck.arch.check_parallel(par.tp, par.pp)
        check_vocab(student_ck.arch.vocab_size, teacher_ck.arch.vocab_size,
                    student_ck.arch.padded_vocab_size(par.tp), teacher_ck.arch.padded_vocab_size(par.tp))
    cache_dir = getattr(getattr(job, "kd", None), "teacher_cache", None)
    spec = LossSpec(vocab_size=student_ck.arch.vocab_size, cached=bool(cache_dir), **spec_overrides)
    ispec = inter_mod.IntermediateSpec.from_kd(job.kd) if teacher_ck and hasattr(job, "kd") else None
    if ispec is not None and job.kd.auto_hidden_pairs:
        ispec.pairs = auto_pairs(job.model.checkpoint, teacher_path, student_ck.arch.num_layers,
                                 teacher_ck.arch.num_layers)
        log.info("kd.auto_hidden_pairs: [student, teacher] layers %s",
                 [list(p) for p in ispec.pairs])
    if ispec is not None and ispec.enabled:
        inter_mod.check_pairs(ispec.pairs, student_ck.arch.num_layers, teacher_ck.arch.num_layers)
        if ispec.dynamic and not spec.logit_weight:
            raise ValueError("kd.hidden_dynamic=true weights the intermediate losses by "
                             "L_logits / L_intermediate, but the logit loss is off "
                             "(kd.logit_weight=0); set kd.hidden_dynamic=false for fixed weights")
    else:
        ispec = None
    start = run_dir_mod.prepare(run_dir, tr.steps, job.resume, getattr(job, "overwrite", False),
                                par.tp, par.pp, tr.distributed_optimizer)
    if start.finished is not None:
        return _finished(run_dir, start.finished, tr.steps)
    resume_from, resume_state = start.resume_from, start.state
    train_data = PackedSequences(job.data.prefix, job.data.seq_length, split="train",
                                 valid_fraction=job.data.valid_fraction, seed=tr.seed)
    valid_data = PackedSequences(job.data.prefix, job.data.seq_length, split="valid",
                                 valid_fraction=job.data.valid_fraction)
    cache = None
    if cache_dir:  # the checks ran in preflight; here only the shards are opened
        from .teacher_cache import TeacherCache

        cache = TeacherCache(cache_dir, tr.steps, job.kd.top_k)

    dist.init(par.tp, par.pp, par.seed, par.timeout_s)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if tr.global_batch_size % (tr.micro_batch_size * dp):
        raise ValueError(f"train.global_batch_size={tr.global_batch_size} is not divisible by "
                         f"micro_batch_size*dp={tr.micro_batch_size}*{dp}")
    n_micro = tr.global_batch_size // (tr.micro_batch_size * dp)
    if len(train_data) < tr.global_batch_size:
        raise ValueError(f"training split has {len(train_data)} samples, fewer than one global "
                         f"batch of {tr.global_batch_size}")
    if dist.is_rank0():
        run_dir.mkdir(parents=True, exist_ok=True)

    student, _ = load_checkpoint(resume_from or job.model.checkpoint, job.model.dtype)
    routing = RoutingMonitor(student)  # MoE students: expert load in the logs (no-op when dense)
    teacher = load_checkpoint(teacher_path, job.model.dtype)[0] if teacher_path else None
    projections = torch.nn.ModuleDict()
    if ispec is not None:
        if student.config.sequence_parallel:
            raise ValueError("kd.hidden_pairs / kd.embedding_weight do not support sequence "
                             "parallelism yet")
        hs, ht = student.arch.hidden_size, teacher.arch.hidden_size
        projections = inter_mod.make_projections(
            ispec, student, hs, ht, seed=par.seed,
            keep_index=inter_mod.pruned_keep_index(job.model.checkpoint, teacher_path, hs, ht))
        if resume_from is not None:
            train_state.load_modules(resume_from, {"projections": projections})
    trained = inter_mod.StudentWithProjections(student.model, projections) if len(projections) \
        else student.model
    ddp = DistributedDataParallel(
        student.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=tr.distributed_optimizer), trained)
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=tr.lr, min_lr=tr.min_lr, weight_decay=tr.weight_decay,
        adam_beta1=0.9, adam_beta2=tr.adam_beta2, clip_grad=tr.clip_grad,
        bf16=job.model.dtype == "bf16", params_dtype=student.config.params_dtype,
        use_distributed_optimizer=tr.distributed_optimizer), [ddp])
    named_params = dict(ddp.module.named_parameters())
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=tr.lr, min_lr=tr.min_lr, lr_warmup_steps=tr.warmup_steps,
        lr_decay_steps=tr.steps, lr_decay_style="cosine", start_wd=tr.weight_decay,
        end_wd=tr.weight_decay, wd_incr_steps=tr.steps, wd_incr_style="constant",
        # on resume the schedule comes from this config, not the checkpoint: after a divergence
        # a rerun with a lower train.lr continues from the last good checkpoint at that lr
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False)
    step = 0
    # multiplier of the intermediate terms: dynamic alpha comes from the previous step's global
    # means, so a fresh run's first step only measures them (alpha 0); fixed weights: 1
    alpha = 0.0 if ispec is not None and ispec.dynamic else 1.0
    guard = Guard(tr, run_dir)
    if resume_from is not None:
        train_state.load(resume_from, resume_state, opt, sched, named_params)
        step = resume_state["step"]
        alpha = resume_state.get("extra", {}).get("alpha", alpha)
        guard.skipped = resume_state.get("extra", {}).get("skipped_steps", 0)
        if dist.is_rank0():
            log.info("resumed from %s at step %d", resume_from, step)
    if dist.is_rank0():  # steps after the start point (all, when starting over) run again
        run_dir_mod.truncate_metrics(run_dir, step)

    inter = inter_mod.IntermediateLosses(ispec, student, teacher, projections) if ispec else None
    inter_names = ([] if ispec is None else
                   (["hidden"] if ispec.pairs else []) + (["emb"] if ispec.embedding_weight > 0 else []))
    pair = DistillPair(ddp, teacher.model if teacher else None, student.arch.hidden_size,
                       teacher.arch.hidden_size if teacher else 0, student.config, inter)
    cfg = pair.config
    cfg.no_sync_func = ddp.no_sync
    cfg.finalize_model_grads_func = lambda _chunks, *a, **k: finalize_model_grads([ddp], *a, **k)
    cfg.grad_scale_func = opt.scale_loss
    loss_func = make_loss_func(spec)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        return (model(batch["tokens"], batch["position_ids"], None, batch["loss_mask"]),
                partial(loss_func, batch))

    def batches_for(step_idx: int):
        """The micro-batches of global batch ``step_idx`` for this DP rank (deterministic order)."""
        out = step_batches(train_data, step_idx, tr.global_batch_size, tr.micro_batch_size,
                           seed=tr.seed, dp_rank=dp_rank, dp_size=dp, with_index=cache is not None)
        if cache is not None:  # the cached teacher top-k of these samples ride with the batch
            out = [dict(b, **cache.lookup(b.pop("sample"))) for b in out]
        return [on_device(b) for b in out]

    logger = Logger(run_dir, tr.tensorboard, tr.wandb, {"train": vars(tr)})
    tokens_per_step = tr.global_batch_size * job.data.seq_length
    fwd_bwd = get_forward_backward_func()
    history, t_last, steps_last = [], time.time(), 0

    def save(at_step: int, final: bool = False) -> Path:
        guard.check_weights(at_step, ddp.module)
        target = run_dir / ("final" if final else f"checkpoints/step_{at_step:07d}")
        return save_checkpoint(
            student, target, tokenizer=student_ck.tokenizer() if dist.is_rank0() else None,
            overwrite=final, provenance={"stage": stage_name, "parent": str(student_ck.path),
                                         "teacher": teacher_path or cache_dir,
                                         "step": at_step},
            per_rank=None if final else train_state.writer(
                opt, sched, at_step, at_step * tr.global_batch_size,
                {"tp": par.tp, "pp": par.pp, "dp": dp,
                 "distributed_optimizer": tr.distributed_optimizer},
                extra={"alpha": alpha, "skipped_steps": guard.skipped},
                modules={"projections": projections} if len(projections) else None,
                named_params=named_params))

    def evaluate() -> float:
        vb = valid_data.batches(tr.micro_batch_size, num_batches=max(1, tr.eval_batches // dp),
                                dp_rank=dp_rank, dp_size=dp)
        return validation_loss(student, vb)["loss"]

    try:
        while step < tr.steps:
            student.model.train()
            ddp.zero_grad_buffer()
            opt.zero_grad()
            if inter is not None:
                inter.set_step(alpha, n_micro)
            reports = fwd_bwd(forward_step_func=forward_step, data_iterator=iter(batches_for(step)),
                              model=[pair], num_microbatches=n_micro, seq_length=job.data.seq_length,
                              micro_batch_size=tr.micro_batch_size, forward_only=False)
            if inter is not None:
                sums = inter.take_sums()
                metrics = reduce_reports(reports, {k: sums.get(k, 0.0) for k in inter_names})
                # the schedule's loss covers the logit/LM terms; add this step's weighted
                # intermediate terms (same token normalisation) for the total
                metrics["loss"] += alpha * (ispec.hidden_weight * metrics.get("hidden", 0.0)
                                            + ispec.embedding_weight * metrics.get("emb", 0.0))
                metrics["alpha"] = alpha
            else:
                metrics = reduce_reports(reports)
            # checked before the update: a non-finite step never reaches the weights
            if guard.step_ok(step + 1, metrics, ddp):
                ok, grad_norm, _ = opt.step()
                guard.check_grad_norm(step + 1, grad_norm)
                if inter is not None and ispec.dynamic:  # next step's alpha: the same on every
                    alpha = ispec.alpha(metrics["kd"], metrics.get("hidden"),  # rank (reduced)
                                        metrics.get("emb"))
                metrics.update(lr=opt.param_groups[0]["lr"], grad_norm=float(grad_norm or 0.0),
                               skipped=not ok)
            else:  # skipped (train.skip_nonfinite_steps): its batch is consumed, nothing learned
                metrics = {"lr": opt.param_groups[0]["lr"], "skipped": True, "nonfinite": True}
            metrics.update(routing.pop())  # MoE expert load of this step's training forwards
            sched.step(increment=1)
            step += 1
            if tr.eval_interval and step % tr.eval_interval == 0 and step < tr.steps:
                metrics["val_loss"] = evaluate()
            history.append({"step": step, **metrics})
            if step % tr.log_interval == 0 or step == tr.steps or "val_loss" in metrics:
                dt = time.time() - t_last
                tps = (step - steps_last) * tokens_per_step / max(dt, 1e-9)
                eta = (tr.steps - step) * dt / max(step - steps_last, 1)
                metrics["tokens_per_s"] = tps
                if dist.is_rank0():
                    parts = [f"step {step}/{tr.steps}"] + (["skipped"] if "nonfinite" in metrics
                                                            else [])
                    parts += [f"{k} {metrics[k]:.4f}" for k in ("loss", "kd", "lm", "hidden", "emb",
                                                                "val_loss", "moe_max_load") if k in metrics]
                    parts += [f"lr {metrics['lr']:.2e}", f"{tps:.0f} tok/s", f"eta {eta:.0f}s"]
                    log.info(" | ".join(parts))
                t_last, steps_last = time.time(), step
            logger.write(step, metrics)
            if tr.save_interval and step % tr.save_interval == 0 and step < tr.steps:
                save(step)
                if dist.is_rank0():
                    train_state.prune_old(run_dir, tr.keep_checkpoints)
        final_val = evaluate()
        logger.write(step, {"val_loss": final_val})
        out = save(step, final=True)
        result = {"final": str(out), "steps": step, "val_loss": final_val,
                  "train_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None)}
        if dist.is_rank0():
            from ..report.stages import training_report

            training_report(run_dir, stage=stage_name, result=result, student=str(student_ck.path),
                            teacher=teacher_path, student_params=student_ck.arch.num_params(),
                            teacher_params=teacher_ck.arch.num_params() if teacher_ck else None,
                            tokens=step * tokens_per_step)
            log.info("final validation loss %.4f; student saved to %s", final_val, out)
        return result
    finally:
        if inter is not None:
            inter.close()
        logger.close()
        dist.release()


def _finished(run_dir: Path, meta: dict, steps: int) -> dict:
    """The result of a run that is already complete (nothing is trained or written)."""
    from ..runtime import dist

    rows = []
    f = run_dir / "metrics.jsonl"
    for line in f.read_text(errors="replace").splitlines() if f.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    val = next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), None)
    loss = next((r["loss"] for r in reversed(rows) if "loss" in r), None)
    if dist.read_env().rank == 0:
        log.warning("%s already finished: final/ holds step %s of train.steps=%d; nothing to do "
                    "(pass overwrite=true to train again, or a larger train.steps to continue)",
                    run_dir, meta.get("step"), steps)
    return {"final": str(run_dir / "final"), "steps": meta.get("step"), "val_loss": val,
            "train_loss": loss, "already_finished": True}

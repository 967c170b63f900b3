"""The trainer shared by distillation and teacher correction (finetune), on megatron-core machinery.

megatron-core supplies the pieces: DDP gradient buffers, its optimizer (Adam, clipping), the
cosine-with-warm-up scheduler and the pipeline schedules (micro-batch accumulation, p2p). A step
consumes ``global_batch_size`` samples: each data-parallel rank runs ``global_batch_size /
(micro_batch_size * dp)`` micro-batches through ``DistillPair`` (student alone when there is no
teacher). What the last stage minimises is the :class:`~.objective.Objective`: the logit/LM terms
of ``job.kd`` for distillation, the LM loss alone for finetune. The loss is averaged per token
within a micro-batch and over micro-batches and ranks. Intermediate hidden-state / embedding
losses (``job.kd.hidden_pairs`` or ``auto_hidden_pairs``, ``embedding_weight``) are computed on
the pipeline stage that holds a pair's later layer (:mod:`.intermediate`); the optimizer may be
megatron-core's distributed one (``train.distributed_optimizer``), its checkpoints independent of
the DP size (:mod:`.optim_state`).

:func:`train` is the entry point: the checks that need no model (:func:`check_sources`), the run
directory's start point (:mod:`.run_dir`), then a :class:`Trainer` that builds, resumes, steps,
evaluates and saves.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..arch import check_layout
from ..artifacts.metrics import METRICS, read_metrics
from ..convert.checkpoint import Checkpoint
from ..data.packed import PackedSequences, step_batches
from ..evaluate.loss import validation_loss
from ..report.stages import training_report
from ..runtime import dist
from ..runtime.adam import use_fused_adam
from ..runtime.forward import on_device
from ..runtime.routing import RoutingMonitor
from ..runtime.shard import load_checkpoint, save_checkpoint
from . import intermediate as inter_mod, optim_state, run_dir as run_dir_mod, train_state
from .guard import Guard, require_finite
from .layer_map import auto_pairs
from .logger import Logger, progress_line
from .losses import check_vocab
from .objective import Objective, reduce_reports
from .pair import DistillPair
from .teacher_cache import TeacherCache

# megatron-core (DDP, optimizer, schedules) is imported where the trainer builds them: it takes
# seconds to import, and preflight and the CLI read this module's helpers without training.

log = logging.getLogger(__name__)


@dataclass
class Sources:
    """What a run trains from, checked before any model is loaded."""

    student: object  # Checkpoint
    teacher: object | None  # Checkpoint of the live teacher (None: finetune, or a teacher cache)
    teacher_path: str | None
    kd: object | None  # the job's KDConfig (None: finetune)
    ispec: inter_mod.IntermediateSpec | None  # intermediate losses, when enabled

    @property
    def cache_dir(self) -> str | None:
        return self.kd.teacher_cache if self.kd is not None else None


def check_sources(job) -> Sources:
    """Layouts, vocabularies and intermediate pairs, checked on the checkpoints' configs alone.
    The teacher is ``job.kd.teacher`` unless its top-k come from ``job.kd.teacher_cache``."""
    par, kd = job.parallel, getattr(job, "kd", None)
    student = Checkpoint(job.model.checkpoint)
    teacher_path = kd.teacher if kd is not None and not kd.teacher_cache else None
    teacher = Checkpoint(teacher_path) if teacher_path else None
    check_layout({"model.checkpoint": student.arch,
                  **({"kd.teacher": teacher.arch} if teacher else {})}, par.tp, par.pp, par.ep)
    check_aux_loss(job.train, student.arch)
    if teacher is None:
        return Sources(student, None, None, kd, None)
    check_vocab(student.arch.vocab_size, teacher.arch.vocab_size,
                student.arch.padded_vocab_size(par.tp), teacher.arch.padded_vocab_size(par.tp))
    ispec = inter_mod.IntermediateSpec.from_kd(kd)
    if kd.auto_hidden_pairs:
        ispec.pairs = auto_pairs(job.model.checkpoint, teacher_path, student.arch.num_layers,
                                 teacher.arch.num_layers)
        log.info("kd.auto_hidden_pairs: [student, teacher] layers %s", [list(p) for p in ispec.pairs])
    if ispec.enabled:  # (kd.hidden_dynamic needs the logit loss: KDConfig checks that)
        inter_mod.check_pairs(ispec.pairs, student.arch.num_layers, teacher.arch.num_layers)
    return Sources(student, teacher, teacher_path, kd, ispec if ispec.enabled else None)


def check_aux_loss(tr, arch) -> None:
    """train.moe_aux_loss_coeff balances routers: a dense student has none."""
    if tr.moe_aux_loss_coeff > 0 and not arch.is_moe:
        raise ValueError(f"train.moe_aux_loss_coeff={tr.moe_aux_loss_coeff} needs a "
                         "mixture-of-experts model (model.checkpoint is dense); set it to 0")


def train(job, stage_name: str) -> dict:
    """Run (or resume) training of ``job`` (a DistillJob, or a FinetuneJob: no teacher, LM loss);
    writes checkpoints and the final student under job.output. ``stage_name`` goes into the
    checkpoints' provenance and the report."""
    tr, par = job.train, job.parallel
    src = check_sources(job)
    start = run_dir_mod.prepare(Path(job.output), tr.steps, job.resume,
                                getattr(job, "overwrite", False), par.tp, par.pp,
                                tr.distributed_optimizer, par.ep)
    if start.finished is not None:
        return _finished(Path(job.output), start.finished, tr.steps)
    trainer = Trainer(job, stage_name, src, start)
    trainer.build()
    trainer.resume()
    trainer.start()
    try:
        return trainer.fit()
    finally:
        trainer.close()


def run_distill(job) -> dict:
    """`minitron distill`: a (pruned) student from a co-located, frozen teacher, or from the
    teacher's cached top-k logits (kd.teacher_cache)."""
    return train(job, "distill")


def run_finetune(job) -> dict:
    """`minitron finetune`: teacher correction, i.e. LM-loss training of the teacher on the
    distillation corpus before it is pruned and distilled from (no teacher)."""
    return train(job, "finetune")


class Trainer:
    """One training run; :func:`train` calls build, resume, start, fit and close in that order."""

    def __init__(self, job, stage_name: str, src: Sources, start: run_dir_mod.Plan):
        self.job, self.tr, self.stage_name, self.src = job, job.train, stage_name, src
        self.run_dir = Path(job.output)
        self.resume_from, self.resume_state = start.resume_from, start.state
        self.ispec = src.ispec
        self.step_idx = 0
        # multiplier of the intermediate terms: dynamic alpha comes from the previous step's
        # global means, so a fresh run's first step only measures them (alpha 0); fixed: 1
        self.alpha = 0.0 if self.ispec is not None and self.ispec.dynamic else 1.0
        self.inter = None
        self.last_loss = None
        self.said_eval_cap = False  # train.eval_batches beyond the held-out split: said once

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        """Data, process groups, models, optimizer and scheduler."""
        self._open_data()
        self._start_groups()
        self._load_models()
        self._make_optimizer()

    def _open_data(self) -> None:
        tr, data = self.tr, self.job.data
        self.train_data = PackedSequences(data.prefix, data.seq_length, split="train",
                                          valid_fraction=data.valid_fraction, seed=tr.seed)
        self.valid_data = PackedSequences(data.prefix, data.seq_length, split="valid",
                                          valid_fraction=data.valid_fraction)
        self.cache = None
        if self.src.cache_dir:  # the checks ran in preflight; here only the shards are opened
            self.cache = TeacherCache(self.src.cache_dir, tr.steps, self.src.kd.top_k)

    def _start_groups(self) -> None:
        tr, p = self.tr, self.job.parallel
        self.par = par = dist.init(p.tp, p.pp, p.seed, p.timeout_s, ep=p.ep)
        if tr.global_batch_size % (tr.micro_batch_size * par.dp):
            raise ValueError(f"train.global_batch_size={tr.global_batch_size} is not divisible by "
                             f"micro_batch_size*dp={tr.micro_batch_size}*{par.dp}")
        self.n_micro = tr.global_batch_size // (tr.micro_batch_size * par.dp)
        if len(self.train_data) < tr.global_batch_size:
            raise ValueError(f"training split has {len(self.train_data)} samples, fewer than one "
                             f"global batch of {tr.global_batch_size}")
        if par.is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def _load_models(self) -> None:
        job, dtype = self.job, self.job.model.dtype
        aux = self.tr.moe_aux_loss_coeff
        self.student, _ = load_checkpoint(self.resume_from or job.model.checkpoint, dtype,
                                          aux_loss_coeff=aux)
        # MoE: expert load (and the load-balancing loss) in the logs; dense: no-op
        self.routing = RoutingMonitor(self.student, aux)
        self.teacher = load_checkpoint(self.src.teacher_path, dtype)[0] \
            if self.src.teacher_path else None
        if self.resume_from is None:  # a resumed run's weights were checked before its save
            require_finite("model.checkpoint", job.model.checkpoint, self.student.model)
        if self.teacher is not None:
            require_finite("kd.teacher", self.src.teacher_path, self.teacher.model)
        self.projections = torch.nn.ModuleDict()
        if self.ispec is not None:
            if self.student.config.sequence_parallel:
                raise ValueError("kd.hidden_pairs / kd.embedding_weight do not support sequence "
                                 "parallelism yet")
            hs, ht = self.student.arch.hidden_size, self.teacher.arch.hidden_size
            self.projections = inter_mod.make_projections(
                self.ispec, self.student, hs, ht, seed=job.parallel.seed,
                keep_index=inter_mod.pruned_keep_index(job.model.checkpoint, self.src.teacher_path,
                                                       hs, ht))
            if self.resume_from is not None:
                train_state.load_modules(self.par, self.resume_from,
                                         {"projections": self.projections})

    def _make_optimizer(self) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        tr, student = self.tr, self.student
        trained = inter_mod.StudentWithProjections(student.model, self.projections) \
            if len(self.projections) else student.model
        self.ddp = DistributedDataParallel(
            student.config, DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                use_distributed_optimizer=tr.distributed_optimizer), trained)
        self.opt = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=tr.lr, min_lr=tr.min_lr, weight_decay=tr.weight_decay,
            adam_beta1=0.9, adam_beta2=tr.adam_beta2, clip_grad=tr.clip_grad,
            bf16=self.job.model.dtype == "bf16", params_dtype=student.config.params_dtype,
            use_distributed_optimizer=tr.distributed_optimizer), [self.ddp])
        use_fused_adam(self.opt)
        self.named_params = dict(self.ddp.module.named_parameters())
        if tr.distributed_optimizer and self.par.is_rank0:
            log.info("distributed optimizer: %s", "; ".join(
                f"{'expert' if s['expert'] else 'dense'} state {s['owned']}/{s['total']} "
                f"elements here ({s['group']} ranks)" for s in optim_state.shards(self.opt)))
        self.sched = OptimizerParamScheduler(
            self.opt, init_lr=0.0, max_lr=tr.lr, min_lr=tr.min_lr, lr_warmup_steps=tr.warmup_steps,
            lr_decay_steps=tr.steps, lr_decay_style="cosine", start_wd=tr.weight_decay,
            end_wd=tr.weight_decay, wd_incr_steps=tr.steps, wd_incr_style="constant",
            # on resume the schedule comes from this config, not the checkpoint: after a
            # divergence a rerun with a lower train.lr continues from the last good checkpoint
            override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False)
        self.guard = Guard(tr, self.run_dir)

    # ------------------------------------------------------------------ resume
    def resume(self) -> None:
        """Optimizer, scheduler, RNG and loop state of the checkpoint the run continues from;
        metrics.jsonl loses the rows past that step (they run again)."""
        if self.resume_from is not None:
            st = self.resume_state
            train_state.load(self.par, self.resume_from, st, self.opt, self.sched,
                             self.named_params)
            use_fused_adam(self.opt)  # the loaded state brings its own flag
            self.step_idx = st["step"]
            self.alpha = st.get("extra", {}).get("alpha", self.alpha)
            self.guard.skipped = st.get("extra", {}).get("skipped_steps", 0)
            if self.par.is_rank0:
                log.info("resumed from %s at step %d", self.resume_from, self.step_idx)
        if self.par.is_rank0:  # steps after the start point (all, when starting over) run again
            run_dir_mod.truncate_metrics(self.run_dir, self.step_idx)

    # ------------------------------------------------------------------ objective and schedule
    def start(self) -> None:
        """The student/teacher pair, the objective and the logger the loop needs."""
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        ispec, teacher, ddp = self.ispec, self.teacher, self.ddp
        if ispec is not None:
            self.inter = inter_mod.IntermediateLosses(ispec, self.student, teacher, self.projections)
        self.inter_names = [] if ispec is None else \
            (["hidden"] if ispec.pairs else []) + (["emb"] if ispec.embedding_weight > 0 else [])
        self.objective = Objective(self.src.kd, self.src.student.arch.vocab_size,
                                   self.par.tp_group if self.par.tp > 1 else None)
        self.pair = DistillPair(ddp, teacher.model if teacher else None,
                                self.student.arch.hidden_size,
                                teacher.arch.hidden_size if teacher else 0, self.student.config,
                                self.inter, fused_output=self.objective.fused_output)
        cfg = self.pair.config
        cfg.no_sync_func = ddp.no_sync
        cfg.finalize_model_grads_func = lambda _chunks, *a, **k: finalize_model_grads([ddp], *a, **k)
        cfg.grad_scale_func = self.opt.scale_loss
        self.fwd_bwd = get_forward_backward_func()
        self.logger = Logger(self.run_dir, self.tr.tensorboard, self.tr.wandb,
                             {"train": vars(self.tr)}, on=self.par.is_rank0)
        self.tokens_per_step = self.tr.global_batch_size * self.job.data.seq_length

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        return (model(batch["tokens"], batch["position_ids"], None, batch["loss_mask"]),
                partial(self.objective.loss_func, batch))

    def _batches(self, step_idx: int) -> list[dict]:
        """The micro-batches of global batch ``step_idx`` for this DP rank (deterministic order)."""
        tr, par, cache = self.tr, self.par, self.cache
        out = step_batches(self.train_data, step_idx, tr.global_batch_size, tr.micro_batch_size,
                           seed=tr.seed, dp_rank=par.dp_rank, dp_size=par.dp,
                           with_index=cache is not None)
        if cache is not None:  # the cached teacher top-k of these samples ride with the batch
            out = [dict(b, **cache.lookup(b.pop("sample"))) for b in out]
        return [on_device(b) for b in out]

    # ------------------------------------------------------------------ one step
    def _forward_backward(self) -> dict:
        """Gradients of this step's global batch; returns its reduced losses."""
        tr, inter, ispec = self.tr, self.inter, self.ispec
        if inter is not None:
            inter.set_step(self.alpha, self.n_micro)
        reports = self.fwd_bwd(forward_step_func=self._forward_step,
                               data_iterator=iter(self._batches(self.step_idx)), model=[self.pair],
                               num_microbatches=self.n_micro, seq_length=self.job.data.seq_length,
                               micro_batch_size=tr.micro_batch_size, forward_only=False)
        if inter is None:
            return self._with_router_loss(reduce_reports(reports, self.par))
        sums = inter.take_sums()
        metrics = reduce_reports(reports, self.par, {k: sums.get(k, 0.0) for k in self.inter_names})
        # the schedule's loss covers the logit/LM terms; add this step's weighted intermediate
        # terms (same token normalisation) for the total
        metrics["loss"] += self.alpha * (ispec.hidden_weight * metrics.get("hidden", 0.0)
                                         + ispec.embedding_weight * metrics.get("emb", 0.0))
        metrics["alpha"] = self.alpha
        return self._with_router_loss(metrics)

    def _with_router_loss(self, metrics: dict) -> dict:
        """The routers' load-balancing term (train.moe_aux_loss_coeff) in the step's total."""
        aux = self.routing.take_aux_loss(self.n_micro)
        if aux:
            metrics["loss"] += aux.pop("moe_aux_term")
            metrics.update(aux)
        return metrics

    def step(self) -> dict:
        """One optimizer step (or a skipped non-finite one); returns the step's metrics."""
        self.student.model.train()
        self.ddp.zero_grad_buffer()
        self.opt.zero_grad()
        metrics = self._forward_backward()
        # checked before the update: a non-finite step never reaches the weights
        if self.guard.step_ok(self.step_idx + 1, metrics, self.ddp):
            ok, grad_norm, _ = self.opt.step()
            self.guard.check_grad_norm(self.step_idx + 1, grad_norm)
            if self.inter is not None and self.ispec.dynamic:  # next step's alpha: the same on
                self.alpha = self.ispec.alpha(metrics["kd"], metrics.get("hidden"),  # every rank
                                              metrics.get("emb"))
            metrics.update(lr=self.opt.param_groups[0]["lr"], grad_norm=float(grad_norm or 0.0), skipped=not ok)
        else:  # skipped (train.skip_nonfinite_steps): its batch is consumed, nothing learned
            metrics = {"lr": self.opt.param_groups[0]["lr"], "skipped": True, "nonfinite": True}
        metrics.update(self.routing.pop())  # MoE expert load of this step's training forwards
        self.sched.step(increment=1)
        self.step_idx += 1
        return metrics

    # ------------------------------------------------------------------ evaluate, save
    def evaluate(self) -> float:
        """Validation loss of the student over ``train.eval_batches`` micro-batches, at most one
        pass over the held-out split (more would score the same samples again, at their cost)."""
        tr, par = self.tr, self.par
        one_pass = len(self.valid_data) // (tr.micro_batch_size * par.dp)
        n = min(max(1, tr.eval_batches // par.dp), one_pass)
        if n < tr.eval_batches // par.dp and not self.said_eval_cap:
            self.said_eval_cap = True
            if par.is_rank0:
                log.info("train.eval_batches=%d: the held-out split holds %d micro-batches of %d "
                         "per rank; validating on those", tr.eval_batches, one_pass,
                         tr.micro_batch_size)
        vb = self.valid_data.batches(tr.micro_batch_size, num_batches=n,
                                     dp_rank=par.dp_rank, dp_size=par.dp)
        return validation_loss(self.student, vb)["loss"]

    def save(self, at_step: int, final: bool = False) -> Path:
        """A resumable checkpoint (weights + training state), or the final student alone."""
        tr, par, src = self.tr, self.par, self.src
        self.guard.check_weights(at_step, self.ddp.module)
        target = self.run_dir / ("final" if final else f"checkpoints/step_{at_step:07d}")
        state = None if final else train_state.writer(
            par, self.opt, self.sched, at_step, at_step * tr.global_batch_size,
            {"tp": par.tp, "pp": par.pp, "dp": par.dp, "ep": par.ep,
             "distributed_optimizer": tr.distributed_optimizer},
            extra={"alpha": self.alpha, "skipped_steps": self.guard.skipped,
                   "data_order": train_state.data_order(self.job.data, tr)},
            modules={"projections": self.projections} if len(self.projections) else None,
            named_params=self.named_params)
        return save_checkpoint(
            self.student, target, tokenizer=src.student.tokenizer(required=False) if par.is_rank0 else None,
            overwrite=final, provenance={"stage": self.stage_name, "parent": str(src.student.path),
                                         "teacher": src.teacher_path or src.cache_dir,
                                         "step": at_step},
            per_rank=state, sharded=tr.sharded_save and not final)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Steps up to train.steps with periodic logging, evaluation and checkpoints; then the
        final evaluation, the final student and the report."""
        tr = self.tr
        self.t_last, self.steps_last = time.time(), self.step_idx
        while self.step_idx < tr.steps:
            metrics = self.step()
            step = self.step_idx
            if tr.eval_interval and step % tr.eval_interval == 0 and step < tr.steps:
                metrics["val_loss"] = self.evaluate()
            if "loss" in metrics:
                self.last_loss = metrics["loss"]
            if step % tr.log_interval == 0 or step == tr.steps or "val_loss" in metrics:
                self._progress(metrics)
            self.logger.write(step, metrics)
            if tr.save_interval and step % tr.save_interval == 0 and step < tr.steps:
                self.save(step)
                if self.par.is_rank0:
                    train_state.prune_old(self.run_dir, tr.keep_checkpoints)
        return self._finish()

    def _progress(self, metrics: dict) -> None:
        """Throughput into ``metrics`` and the progress line on rank 0."""
        step, steps = self.step_idx, self.tr.steps
        dt = time.time() - self.t_last
        tps = (step - self.steps_last) * self.tokens_per_step / max(dt, 1e-9)
        eta = (steps - step) * dt / max(step - self.steps_last, 1)
        metrics["tokens_per_s"] = tps
        if self.par.is_rank0:
            log.info(progress_line(step, steps, metrics, tps, eta))
        self.t_last, self.steps_last = time.time(), step

    def _finish(self) -> dict:
        final_val = self.evaluate()
        self.logger.write(self.step_idx, {"val_loss": final_val})
        out = self.save(self.step_idx, final=True)
        result = {"final": str(out), "steps": self.step_idx, "val_loss": final_val,
                  "train_loss": self.last_loss}
        if self.par.is_rank0:
            src = self.src
            training_report(self.run_dir, stage=self.stage_name, result=result,
                            student=str(src.student.path), teacher=src.teacher_path,
                            student_params=src.student.arch.num_params(),
                            teacher_params=src.teacher.arch.num_params() if src.teacher else None,
                            tokens=self.step_idx * self.tokens_per_step)
            log.info("final validation loss %.4f; %s saved to %s", final_val,
                     "model" if self.stage_name == "finetune" else "student", out)
        return result

    def close(self) -> None:
        if self.inter is not None:
            self.inter.close()
        self.logger.close()
        dist.release()


def _finished(run_dir: Path, meta: dict, steps: int) -> dict:
    """The result of a run that is already complete (nothing is trained or written)."""
    f = run_dir / METRICS
    rows = read_metrics(f) if f.is_file() else []
    val = next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), None)
    loss = next((r["loss"] for r in reversed(rows) if "loss" in r), None)
    if dist.read_env().rank == 0:
        log.warning("%s already finished: final/ holds step %s of train.steps=%d; nothing to do "
                    "(pass overwrite=true to train again, or a larger train.steps to continue)",
                    run_dir, meta.get("step"), steps)
    return {"final": str(run_dir / "final"), "steps": meta.get("step"), "val_loss": val,
            "train_loss": loss, "already_finished": True}

"""Evaluate one checkpoint at a given layout: held-out loss/perplexity (and, when asked,
downstream tasks). :func:`evaluate_checkpoint` is shared by the pipeline and the search;
:func:`run` is the `minitron evaluate` command (results JSON + Markdown report)."""

from __future__ import annotations

import datetime
import logging
import time
from pathlib import Path

from ..arch import check_layout
from ..artifacts.evaluation import write_eval
from ..report.stages import evaluate_report

from ..convert.checkpoint import Checkpoint
from ..data.packed import PackedSequences
from ..runtime import dist
from ..runtime.shard import load_checkpoint
from . import reuse
from .loss import validation_loss
from .multiple_choice import evaluate_tasks

log = logging.getLogger(__name__)


def check_evaluate(arch, parallel, ev) -> None:
    """The layout, checked before any model is built."""
    check_layout({"model.checkpoint": arch}, parallel.tp, parallel.pp, parallel.ep)


def evaluate_checkpoint(checkpoint: str, parallel, data, ev, dtype: str = "fp32") -> dict:
    check_evaluate(Checkpoint(checkpoint).arch, parallel, ev)
    valid = PackedSequences(data.prefix, data.seq_length, split="valid",
                            valid_fraction=data.valid_fraction, seed=parallel.seed)
    par = dist.init(parallel.tp, parallel.pp, parallel.seed, parallel.timeout_s, ep=parallel.ep)
    try:
        # rank 0 alone keys, looks up and stores (the key reads the data index and weight samples)
        k = reuse.key(checkpoint, data, ev, dtype, par.layout, parallel.seed) \
            if ev.reuse and par.is_rank0 else None
        earlier = dist.broadcast_from_rank0(reuse.lookup(k) if k else None)
        if earlier is not None:  # rank 0 decides: every rank skips the model, or none does
            if par.is_rank0:
                log.info("reusing the results of an identical evaluation of %s: %s "
                         "(eval.reuse=false evaluates again)", checkpoint, reuse.entry(k))
            return earlier
        t0 = time.time()
        shard, _ = load_checkpoint(checkpoint, dtype)
        dp = par.dp
        full = len(valid) // (ev.micro_batch_size * dp)
        n = full if ev.num_batches is None else min(ev.num_batches, full)
        if n < 1:
            raise ValueError(f"held-out split has {len(valid)} samples of {data.seq_length} "
                             f"tokens, fewer than one global batch of {ev.micro_batch_size * dp}; "
                             "lower eval.micro_batch_size or data.seq_length")
        if ev.num_batches is not None and n < ev.num_batches and par.is_rank0:
            log.info("eval.num_batches=%d: the held-out split holds %d batches of %d; evaluating "
                     "those (%d tokens)", ev.num_batches, n, ev.micro_batch_size * dp,
                     n * ev.micro_batch_size * dp * data.seq_length)
        batches = valid.batches(ev.micro_batch_size, num_batches=n, dp_rank=par.dp_rank, dp_size=dp)
        result = validation_loss(shard, batches, progress="evaluate")
        if ev.tasks:
            result["tasks"] = evaluate_tasks(
                shard, Checkpoint(checkpoint).tokenizer(), list(ev.tasks), limit=ev.limit,
                num_fewshot=ev.num_fewshot, seed=ev.fewshot_seed,
                micro_batch_size=ev.task_batch_size, par=par)
            if par.is_rank0:
                for task, r in result["tasks"]["results"].items():
                    log.info("%-14s acc %.3f | acc_norm %.3f ± %.3f | chance %.3f | n %d", task,
                             r["acc"], r["acc_norm"], r["acc_norm_stderr"], r["chance"], r["n"])
        result.update(checkpoint=str(checkpoint), data=data.prefix, seq_length=data.seq_length,
                      layout=par.layout,
                      seconds=round(time.time() - t0, 2))
        if par.is_rank0:
            log.info("validation loss %.4f | perplexity %.2f | %d tokens | %.1f s",
                     result["loss"], result["perplexity"], result["tokens"], result["seconds"])
            if k:
                reuse.store(k, result)
        return result
    finally:
        dist.release()


def run(job) -> dict:
    from ..runtime import dist

    result = evaluate_checkpoint(job.model.checkpoint, job.parallel, job.data, job.eval,
                                 job.model.dtype)
    if dist.is_rank0():
        out = Path(job.output) if job.output else default_output()
        out.parent.mkdir(parents=True, exist_ok=True)
        write_eval(out, result)  # whole or absent, never cut
        md = evaluate_report(out.with_suffix(".md"), result)
        log.info("results: %s (and %s)", out, md.name)
    return result


def default_output() -> Path:
    """Without output=: outputs/evaluate/<time>/eval_results.json, made once results exist
    (Hydra's own run directory is off, so a failed evaluation leaves nothing behind)."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return Path("outputs") / "evaluate" / stamp / "eval_results.json"

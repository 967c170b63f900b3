"""One offline teacher cache for every candidate of a search (``search.teacher_cache``).

Every candidate is distilled from the same teacher (the search's source) on the same tokens (same
data, seq length, seed and global batch), so the teacher's outputs are the same for all of them:
the search runs the teacher once, into a cache covering the longest run it will do (the short
distillation or the confirmation), and each candidate reads its top-k from there instead of
building the teacher again. The cache lives under the search's output and is resumed like every
other stage; a cache of other settings there is refused before any model is built.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..config.schema import TeacherCacheJob
from ..convert import checkpoint as ckpt
from ..distill import teacher_cache as tc
from ..runs import with_checkpoint

log = logging.getLogger(__name__)

DIRNAME = "teacher_cache"
FIELD = "search.teacher_cache"


def live_teacher_needed(kd) -> str | None:
    """Why these kd settings need the live teacher (a cache holds top-k log-probabilities only),
    or None when a cache serves them."""
    if kd.kind != "forward":
        return f"kd.kind={kd.kind}"
    if kd.hidden_pairs or kd.auto_hidden_pairs or kd.embedding_weight:
        return "kd.hidden_pairs / kd.auto_hidden_pairs / kd.embedding_weight"
    if not kd.logit_weight:
        return "kd.logit_weight=0"
    return None


def cache_path(job) -> Path | None:
    """Where the search's shared cache is (built or to build), None for the live teacher (or
    the user's own kd.teacher_cache, which the candidates read as given)."""
    mode = job.search.teacher_cache
    if job.kd.teacher_cache or mode == "off":
        return None
    if mode == "auto":
        return None if live_teacher_needed(job.kd) else Path(job.output) / DIRNAME
    return Path(mode)


def steps_covered(search) -> int:
    """Training steps the cache must hold: the short runs' and the confirmation's, if any."""
    return max(search.steps, search.confirm_steps if search.confirm_top else 0)


def cache_job(job, path: Path, teacher=None, steps: int | None = None) -> TeacherCacheJob:
    """The `minitron teacher_cache` job of ``teacher`` (the job's model by default) over the
    tokens of ``steps`` training steps (by default those the search's runs read)."""
    teacher = str(teacher or job.model.checkpoint)
    return TeacherCacheJob(
        model=with_checkpoint(job.model, teacher), parallel=job.parallel, data=job.data,
        train=dataclasses.replace(job.train, steps=steps or steps_covered(job.search)),
        kd=dataclasses.replace(job.kd, teacher=teacher, top_k=None, teacher_cache=None),
        cache=job.cache, output=str(path))


def check_sizes(job, vocab: int, field: str) -> None:
    """cache.k fits the vocabulary and kd.top_k fits in cache.k (one line naming the field)."""
    if job.cache.k > vocab:
        raise ValueError(f"cache.k={job.cache.k} exceeds the teacher's vocabulary ({vocab}); "
                         f"lower cache.k or set {field}=off")
    if job.kd.top_k is not None and job.kd.top_k > job.cache.k:
        raise ValueError(f"kd.top_k={job.kd.top_k} is more than cache.k={job.cache.k} ids per "
                         f"token of the teacher cache; raise cache.k or set {field}=off")


def check_before_distill(dj, student) -> None:
    """A distillation about to read kd.teacher_cache: the cache is of its teacher, tokenizer,
    data and order, and covers its steps (fingerprints; reads small files only)."""
    if dj.kd.teacher_cache:
        tc.check_run(dj.kd.teacher_cache, teacher=dj.kd.teacher, student=str(student),
                     data=dj.data, train=dj.train, kd=dj.kd)


def check(job) -> None:
    """Pre-flight: refuse settings the shared cache cannot serve, naming the field; reads only
    small files (arch.json, manifest, a few blocks of the weights for the fingerprint)."""
    mode, kd, path = job.search.teacher_cache, job.kd, cache_path(job)
    if mode not in ("auto", "off") and not kd.teacher_cache:
        why = live_teacher_needed(kd)
        if why:
            raise ValueError(f"{FIELD}={mode}: {why} needs the live teacher, which a cache does "
                             f"not hold; set {FIELD}=off or drop {why.split(' ')[0]}")
    if path is None:
        return
    vocab = ckpt.Checkpoint(job.model.checkpoint).arch.vocab_size
    check_sizes(job, vocab, FIELD)
    cj = cache_job(job, path)
    want = tc.describe(cj.kd.teacher, cj.data, cj.train, kd.temperature, cj.cache.k,
                       cj.cache.dtype, vocab)
    tc.check_output(path, want, False, FIELD, f"set {FIELD}=off")


def build(job, steps) -> object:
    """``job`` with kd.teacher_cache pointing at the search's shared cache (built now unless
    complete), or ``job`` itself when the candidates use the live teacher."""
    path = cache_path(job)
    if path is None:
        why = live_teacher_needed(job.kd)
        if job.search.teacher_cache == "auto" and why and not job.kd.teacher_cache:
            log.info("search: %s needs the live teacher: no shared teacher cache", why)
        return job
    cj = cache_job(job, path)
    steps.run("teacher cache", tc.complete(path, cj.train.steps), lambda: tc.build(cj))
    return dataclasses.replace(job, kd=dataclasses.replace(job.kd, teacher_cache=str(path)))

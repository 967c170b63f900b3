"""The `minitron import` and `minitron export` commands: a job in, the written directory out.

Import: a Hugging Face model (dir, hub name, GGUF) or a megatron-core distributed checkpoint ->
our checkpoint. Export: our checkpoint -> a Hugging Face directory loadable by from_pretrained,
or (format=megatron) a megatron-core distributed checkpoint Megatron-LM continues training from.
"""

from __future__ import annotations

import logging

from .convert.hf import export_hf, import_hf
from .convert.megatron_dist import import_megatron, is_megatron_checkpoint
from .runtime.megatron_save import export_megatron

log = logging.getLogger(__name__)


def run_import(job) -> dict:
    out = job.output or job.model.checkpoint
    if is_megatron_checkpoint(job.model.source):
        path = import_megatron(job.model.source, out, arch_overrides=job.model.arch,
                               tokenizer=job.model.tokenizer, dtype=job.dtype,
                               overwrite=job.overwrite)
    else:
        path = import_hf(job.model.source, out, gguf_file=job.model.gguf_file, dtype=job.dtype,
                         overwrite=job.overwrite)
    log.info("imported %s -> %s", job.model.source, path)
    return {"checkpoint": str(path)}


def run_export(job) -> dict:
    if job.format == "megatron":
        path = export_megatron(job.model.checkpoint, job.output, dtype=job.dtype,
                               tp=job.parallel.tp, pp=job.parallel.pp, overwrite=job.overwrite)
        log.info("exported %s -> %s (megatron torch_dist)", job.model.checkpoint, path)
        return {"megatron_dir": str(path)}
    path = export_hf(job.model.checkpoint, job.output, dtype=job.dtype, overwrite=job.overwrite)
    log.info("exported %s -> %s", job.model.checkpoint, path)
    return {"hf_dir": str(path)}

"""`minitron import`: Hugging Face model or megatron-core distributed checkpoint -> our checkpoint."""

import logging

from .main import hydra_app

log = logging.getLogger(__name__)


def run(job) -> dict:
    from ..convert.hf import import_hf
    from ..convert.megatron_dist import import_megatron, is_megatron_checkpoint

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


def main():
    return hydra_app("import", run)

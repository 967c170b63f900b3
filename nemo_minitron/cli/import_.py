"""`minitron import`: Hugging Face model -> our checkpoint directory."""

import logging

from .main import hydra_app

log = logging.getLogger(__name__)


def run(job) -> dict:
    from ..convert.hf import import_hf

    out = job.output or job.model.checkpoint
    path = import_hf(job.model.source, out, gguf_file=job.model.gguf_file, dtype=job.dtype,
                     overwrite=job.overwrite)
    log.info("imported %s -> %s", job.model.source, path)
    return {"checkpoint": str(path)}


def main():
    return hydra_app("import", run)

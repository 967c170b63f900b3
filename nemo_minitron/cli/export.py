"""`minitron export`: our checkpoint -> Hugging Face directory loadable by from_pretrained."""

import logging

from .main import hydra_app

log = logging.getLogger(__name__)


def run(job) -> dict:
    from ..convert.hf import export_hf

    path = export_hf(job.model.checkpoint, job.output, dtype=job.dtype, overwrite=job.overwrite)
    log.info("exported %s -> %s", job.model.checkpoint, path)
    return {"hf_dir": str(path)}


def main():
    return hydra_app("export", run)

"""`minitron export`: our checkpoint -> Hugging Face directory loadable by from_pretrained, or
(format=megatron) a megatron-core distributed checkpoint Megatron-LM continues training from."""

import logging

from .main import hydra_app

log = logging.getLogger(__name__)


def run(job) -> dict:
    if job.format == "megatron":
        from ..runtime.megatron_save import export_megatron

        path = export_megatron(job.model.checkpoint, job.output, dtype=job.dtype,
                               tp=job.parallel.tp, pp=job.parallel.pp, overwrite=job.overwrite)
        log.info("exported %s -> %s (megatron torch_dist)", job.model.checkpoint, path)
        return {"megatron_dir": str(path)}
    from ..convert.hf import export_hf

    path = export_hf(job.model.checkpoint, job.output, dtype=job.dtype, overwrite=job.overwrite)
    log.info("exported %s -> %s", job.model.checkpoint, path)
    return {"hf_dir": str(path)}


def main():
    return hydra_app("export", run)

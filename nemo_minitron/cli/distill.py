"""`minitron distill`: train a (pruned) student from a co-located, frozen teacher."""

from .main import hydra_app


def run(job) -> dict:
    from ..distill.loop import train

    kd = job.kd
    spec = dict(logit_weight=kd.logit_weight, lm_weight=kd.lm_weight, temperature=kd.temperature,
                kind=kd.kind, top_k=kd.top_k, chunk_tokens=kd.chunk_tokens)
    if kd.teacher_cache:  # no teacher is built: its top-k come from the cache with each batch
        spec["cache_residual"] = kd.cache_residual
    return train(job, None if kd.teacher_cache else kd.teacher, spec, "distill")


def main():
    return hydra_app("distill", run)

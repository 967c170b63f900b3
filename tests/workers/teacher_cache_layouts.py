"""Run under torchrun with 2 ranks (or 4: TP=2 x PP=2 only): the offline teacher cache at other
layouts.

Builds the cache at TP=2, PP=2 and DP=2 (each into ``out/build_<layout>``, to be compared with the
one-process build), then distils from the one-process cache at PP=2, DP=2 and TP=2 (renormalised
top-k and residual bucket; each rank looks its samples up by number, the KL runs per vocabulary
shard), and resumes the TP=2 bucket run from its step-2 checkpoint (``tp2_bucket_resumed``).
Emits each distillation's per-step metrics (rank 0)."""

import os
import shutil
import sys

import torch

from nemo_minitron import preflight
from nemo_minitron.config.schema import CacheConfig, KDConfig, ParallelConfig, TeacherCacheJob
from nemo_minitron.distill import teacher_cache as tc
from nemo_minitron.distill.trainer import run_distill
from nemo_minitron.runtime import dist

from tests.helpers.metrics import metrics, series
from tests.workers._emit import emit
from tests.workers.distill_layouts import job

BUILDS = {"tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}
BUILDS_4 = {"tp2pp2": (2, 2)}  # with 4 ranks: both splits at once, the layout a node would use


def build(student, teacher, data, out, k, builds):
    for name, (tp, pp) in builds.items():
        d = job(student, teacher, data, "unused", tp, pp)
        j = TeacherCacheJob(model=d.model, parallel=ParallelConfig(tp=tp, pp=pp), data=d.data,
                            train=d.train, kd=KDConfig(teacher=teacher),
                            cache=CacheConfig(k=k, dtype="fp32"), output=f"{out}/build_{name}")
        preflight.check("teacher_cache", j)
        tc.build(j)


def distill(name, student, teacher, data, cache, out, tp, pp, **kd):
    j = job(student, teacher, data, f"{out}/{name}", tp, pp)
    j.train.save_interval = 2
    j.kd = KDConfig(teacher=teacher, lm_weight=0.0, chunk_tokens=16, teacher_cache=cache, **kd)
    preflight.check("distill", j)
    res = run_distill(j)
    if torch.distributed.get_rank() == 0:
        emit({"layout": name, "val_loss": res["val_loss"],
              **series(metrics(j.output), ("loss", "kd", "grad_norm"))})


def main(student, teacher, data, cache, out, k):
    if int(os.environ["WORLD_SIZE"]) == 4:  # torchrun's; the process group starts in build
        build(student, teacher, data, out, int(k), BUILDS_4)
        distill("tp2pp2_bucket", student, teacher, data, cache, out, 2, 2)
        return
    build(student, teacher, data, out, int(k), BUILDS)
    for name, tp, pp, kd in (("pp2", 1, 2, {}), ("dp2", 1, 1, {}),
                             ("tp2_renorm", 2, 1, {"cache_residual": False}),
                             ("tp2_bucket", 2, 1, {})):
        distill(name, student, teacher, data, cache, out, tp, pp, **kd)
    if torch.distributed.get_rank() == 0:  # the run as it stood at its step-2 checkpoint
        shutil.copytree(f"{out}/tp2_bucket", f"{out}/tp2_bucket_resumed",
                        ignore=shutil.ignore_patterns("final"))
    dist.barrier()
    distill("tp2_bucket_resumed", student, teacher, data, cache, out, 2, 1)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Run under torchrun with 2 ranks (DP=2): evaluate a tiny checkpoint twice with eval.reuse on;
the second time every rank must skip the model (the loader raises if called). Emits, per rank,
what each evaluation returned."""

import os
import sys
from pathlib import Path

import torch

from nemo_minitron.config.schema import DataConfig, EvalConfig, ParallelConfig
from nemo_minitron.evaluate import reuse
from nemo_minitron.evaluate import run as erun
from nemo_minitron.runtime import dist

from tests.workers._emit import emit


def summary(res):
    (task,) = res["tasks"]["results"].values()
    return {"loss": res["loss"], "acc": task["acc"]}


def main(root, task):
    os.environ["NEMO_MINITRON_CACHE"] = str(Path(root) / "cache")
    data = DataConfig(prefix=f"{root}/corpus", seq_length=32, valid_fraction=0.1)
    ev = EvalConfig(micro_batch_size=2, num_batches=2, tasks=[f"jsonl:{task}"])
    go = lambda: erun.evaluate_checkpoint(f"{root}/teacher", ParallelConfig(), data, ev, "fp32")  # noqa: E731
    first = summary(go())
    dist.barrier()

    def refuse(*a, **k):
        raise AssertionError("the model was loaded: the evaluation ran again")

    erun.load_checkpoint = refuse
    second = summary(go())
    emit({"rank": torch.distributed.get_rank(), "first": first, "second": second,
          "stored": len(list(reuse.store_dir().glob("*.json")))})
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])

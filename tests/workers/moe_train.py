"""Run under torchrun with 2 ranks: distillation and evaluation of a tiny Mixtral student at
parallel.ep=1 and ep=2 (both with the two ranks as data-parallel replicas: at ep=2 the experts
are split over them, the dense weights replicated), from a Mixtral teacher and from a dense Llama
teacher with hidden-state pairs, and at ep=2 with the distributed optimizer (how it cuts its
state on each rank: dense over both ranks, experts over each expert's one); both ep=2 runs from the
Mixtral teacher continue from their step-2 checkpoints after final/ is moved aside to
<name>.first_final; then `evaluate` of the MoE student at ep=1 and ep=2, and its multiple-choice scores
of <root>/task.jsonl at ep=1 and ep=2 (and `evaluate` with that task at ep=2).

Emits per run: its per-step metrics (rank 0), layout sizes and final val loss; per evaluation
its loss and token count; per rank the task scores it got back and the distributed optimizer's
shards.
"""

import shutil
import sys

import torch

from nemo_minitron.config.schema import DataConfig, EvalConfig, ParallelConfig
from nemo_minitron.distill import optim_state
from nemo_minitron.distill.run_dir import Plan
from nemo_minitron.distill.trainer import Trainer, check_sources, train
from nemo_minitron.evaluate.multiple_choice import score_items
from nemo_minitron.evaluate.run import evaluate_checkpoint
from nemo_minitron.evaluate.tasks import load_task
from nemo_minitron.runtime import dist
from nemo_minitron.runtime.parallel import current
from nemo_minitron.runtime.shard import load_checkpoint

from tests.helpers.metrics import metrics, series
from tests.workers._emit import emit
from tests.workers.distill_layouts import job as distill_job

KEYS = ("loss", "grad_norm", "hidden", "moe_max_load", "moe_min_load", "moe_load_cv")
# student layers 0, 1 against teacher layers 1, 3: both tiny models have hidden size 128
DENSE_KD = dict(hidden_pairs=[[0, 1], [1, 3]], hidden_dynamic=False)


def job(root, teacher, name, ep, **kw):
    j = distill_job(f"{root}/student", f"{root}/{teacher}", f"{root}/corpus", f"{root}/{name}",
                    1, 1, **kw.pop("kd", {}))
    j.parallel.ep = ep
    for k, v in kw.items():
        setattr(j.train, k, v)
    return j


def run(name, j):
    res = train(j, "distill")
    par = current()
    if par.is_rank0:
        emit({"run": name, "val_loss": res["val_loss"], **series(metrics(j.output), KEYS)})
    return res


def main(root):
    for name, teacher, ep, kd in (("moe_ep1", "teacher", 1, {}), ("moe_ep2", "teacher", 2, {}),
                                  ("dense_ep1", "dense", 1, DENSE_KD),
                                  ("dense_ep2", "dense", 2, DENSE_KD)):
        run(name, job(root, teacher, name, ep, kd=kd, save_interval=2))
    run("moe_ep2_zero", job(root, "teacher", "moe_ep2_zero", 2, save_interval=2,
                            distributed_optimizer=True))
    optimizer_shards(root)
    dist.init(1, 1, ep=2)
    par = current()
    emit({"run": "layout", "rank": par.rank, "dp": par.dp, "ep": par.ep, "ep_rank": par.ep_rank,
          "expert_dp": torch.distributed.get_world_size(par.expert_dp_group)})
    for name, zero in (("moe_ep2", False), ("moe_ep2_zero", True)):
        if par.is_rank0:  # again from the step-2 checkpoint (ep-named optimizer files)
            shutil.move(f"{root}/{name}/final", f"{root}/{name}.first_final")
        torch.distributed.barrier()
        run(f"{name}_resumed", job(root, "teacher", name, 2, save_interval=2,
                                   distributed_optimizer=zero))
    data = DataConfig(prefix=f"{root}/corpus", seq_length=32, valid_fraction=0.1)
    for ep in (1, 2):
        res = evaluate_checkpoint(f"{root}/moe_ep1/final", ParallelConfig(ep=ep), data,
                                  EvalConfig(micro_batch_size=2, num_batches=2))
        emit({"run": f"eval_ep{ep}", "rank": par.rank, "loss": res["loss"],
              "tokens": res["tokens"], "layout": res["layout"]})
    tasks(root, data)
    dist.shutdown()


def optimizer_shards(root):
    """Build (not train) the ep=2 student with the distributed optimizer; emit per rank how each
    optimizer part (dense, experts) cuts its state."""
    j = job(root, "teacher", "shards", 2, distributed_optimizer=True)
    trainer = Trainer(j, "distill", check_sources(j), Plan())
    trainer.build()
    for s in optim_state.shards(trainer.opt):
        emit({"run": "zero_shards", "rank": current().rank, **s})
    dist.release()


def tasks(root, data):
    """Multiple-choice scores at ep=1 and ep=2 (micro-batches of 3 rows: the two ranks' batches
    differ in number and length), then `evaluate` with the task at ep=2."""
    task = f"jsonl:{root}/task.jsonl"
    items = load_task(task)
    for ep in (1, 2):
        par = dist.init(1, 1, ep=ep)
        shard, c = load_checkpoint(f"{root}/moe_ep1/final")
        emit({"run": f"mc_ep{ep}", "rank": par.rank,
              "scores": score_items(shard, c.tokenizer(), items, micro_batch_size=3,
                                    progress=False)})
    res = evaluate_checkpoint(f"{root}/moe_ep1/final", ParallelConfig(ep=2), data,
                              EvalConfig(micro_batch_size=2, num_batches=1, tasks=[task],
                                         task_batch_size=3))
    emit({"run": "eval_tasks_ep2", "rank": current().rank,
          "acc": res["tasks"]["results"][task]["acc"]})


if __name__ == "__main__":
    main(*sys.argv[1:])

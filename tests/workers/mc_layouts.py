"""Run under torchrun with 2 ranks: score a JSONL multiple-choice task at TP=2, PP=2 and DP=2.

Emits, per rank and layout, the scores every rank got back (full and left-truncated inputs), the
accuracy, and for DP=2 the result of ``evaluate_tasks``.
"""

import sys

import torch

from nemo_minitron.evaluate.multiple_choice import accuracy, evaluate_tasks, score_items
from nemo_minitron.evaluate.tasks import load_task
from nemo_minitron.runtime import dist
from nemo_minitron.runtime.shard import load_checkpoint

from tests.workers._emit import emit


def main(ckpt_dir, jsonl):
    task = f"jsonl:{jsonl}"
    items = load_task(task)
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2), ("dp2", 1, 1)):
        dist.init(tp, pp)
        shard, c = load_checkpoint(ckpt_dir)
        tok = c.tokenizer()
        scores = score_items(shard, tok, items, micro_batch_size=3, progress=False)
        trunc = score_items(shard, tok, items, micro_batch_size=3, max_length=24, progress=False)
        row = {"layout": name, "rank": torch.distributed.get_rank(), "scores": scores,
               "scores_trunc": trunc, "acc": accuracy(items, scores)}
        if name == "dp2":
            row["evaluate"] = evaluate_tasks(shard, tok, [task], micro_batch_size=3,
                                             progress=False)
        emit(row)
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Run under torchrun with 2 ranks: ``score_continuations`` (log-probability + greedy flag, the
lm-eval adapter's scorer) at TP=2 and PP=2, on token-id requests read from a JSON file."""

import json
import sys

import torch

from nemo_minitron.evaluate.multiple_choice import score_continuations
from nemo_minitron.runtime import dist
from nemo_minitron.runtime.shard import load_checkpoint

from tests.workers._emit import emit


def main(ckpt_dir, requests_json):
    encoded = [tuple(r) for r in json.loads(open(requests_json).read())]
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2)):
        dist.init(tp, pp)
        shard, _ = load_checkpoint(ckpt_dir)
        out = score_continuations(shard, encoded, micro_batch_size=3, progress=False)
        emit({"layout": name, "rank": torch.distributed.get_rank(), "scored": out})
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])

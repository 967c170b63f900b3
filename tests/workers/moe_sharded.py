"""Run under torchrun with 2 ranks: a tiny Qwen2-MoE (routed experts and a shared expert) at EP=2
saved both ways, gathered (<root>/ep2) and sharded (<root>/ep2_sharded), counting the
floating-point tensors each save passes through all_gather; the sharded save loaded back at EP=2
(every local tensor and the logits bitwise those saved: what a resume restores), then at EP=1
(two data-parallel replicas), TP=2 and PP=2, each layout's logits against the EP=2 model's."""

import sys

import torch

from nemo_minitron.runtime import dist
from nemo_minitron.runtime.forward import gather_logits, run_forward
from nemo_minitron.runtime.shard import load_checkpoint
from nemo_minitron.runtime.sharded_save import local_state

from tests.workers._emit import emit
from tests.workers.layouts import both_saves, logits_of, max_delta


def forward(stage, batch):
    outs = run_forward(stage, [batch], lambda lg, _: {
        "logits": gather_logits(lg, stage.arch.vocab_size)})
    return outs[0]["logits"] if outs else None


def main(root):
    ref = torch.load(f"{root}/ref.pt")
    b = ref["batches"][0]
    dist.init(1, 1, ep=2)
    stage, _ = load_checkpoint(f"{root}/src")
    logits = forward(stage, b)
    gathers = both_saves(stage, f"{root}/ep2")
    back, _ = load_checkpoint(f"{root}/ep2_sharded")
    mine, again = local_state(stage), local_state(back)
    emit({"layout": "ep2", "gathers": gathers, "rank": torch.distributed.get_rank(),
          "resumed_bitwise": mine.keys() == again.keys()
          and all(torch.equal(mine[k], again[k]) for k in mine),
          "logits_bitwise": torch.equal(forward(back, b), logits),
          "max_dlogit_ref": max_delta(logits, ref["logits"])})
    for name, tp, pp in (("ep1", 1, 1), ("tp2", 2, 1), ("pp2", 1, 2)):
        dist.init(tp, pp)
        got = logits_of(f"{root}/ep2_sharded", b, stage.arch.vocab_size)
        emit({"layout": name, "max_dlogit": max_delta(got, logits)})
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])

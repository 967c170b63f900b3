"""Run under torchrun with 2 ranks: a tiny Qwen2-MoE (routed experts and a gated shared expert)
at EP=2 (experts split, the shared expert on both ranks) and TP=2 (the shared expert split like a
dense MLP), logits against transformers' reference; saved back from EP=2 into <root>/ep2; then
`prune` (8 -> 4 experts, expert width and shared width halved) at EP=2 into <root>/pruned_ep2 and
at TP=2 (expert and shared-expert neurons split over the two ranks) into <root>/pruned_tp2."""

import sys

import torch

from nemo_minitron.config.schema import (DataConfig, ModelConfig, ParallelConfig, PruneConfig,
                                         PruneJob, Targets)
from nemo_minitron.pruning.run import prune
from nemo_minitron.runtime import dist
from nemo_minitron.runtime.forward import gather_logits, run_forward
from nemo_minitron.runtime.shard import load_checkpoint, save_checkpoint

from tests.workers._emit import emit

TARGET = dict(num_experts=4, ffn_hidden_size=32, moe_shared_expert_intermediate_size=48,
              hidden_size=96)


def prune_job(root, data_prefix, ep, tp=1):
    return PruneJob(model=ModelConfig(name="qwen2_moe", checkpoint=f"{root}/src"),
                    parallel=ParallelConfig(ep=ep, tp=tp),
                    data=DataConfig(prefix=data_prefix, seq_length=32, valid_fraction=0.1),
                    prune=PruneConfig(target=Targets(**TARGET), calib_samples=8,
                                      micro_batch_size=2),
                    output=f"{root}/pruned_" + (f"tp{tp}" if tp > 1 else f"ep{ep}"))


def main(root, data_prefix):
    ref = torch.load(f"{root}/ref.pt")
    for name, tp, ep in (("ep2", 1, 2), ("tp2", 2, 1)):
        dist.init(tp, 1, ep=ep)
        shard, c = load_checkpoint(f"{root}/src")
        outs = run_forward(shard, ref["batches"],
                           lambda lg, _: {"logits": gather_logits(lg, c.arch.vocab_size)})
        emit({"layout": name, "rank": torch.distributed.get_rank(),
              "max_dlogit": (outs[0]["logits"] - ref["logits"]).abs().max().item()})
        if name == "ep2":
            save_checkpoint(shard, f"{root}/ep2")
    for layout, ep, tp in (("prune_ep2", 2, 1), ("prune_tp2", 1, 2)):
        res = prune(prune_job(root, data_prefix, ep=ep, tp=tp))
        emit({"layout": layout, **{k: v for k, v in res.items() if k != "checkpoint"}})
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])

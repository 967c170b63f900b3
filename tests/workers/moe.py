"""Run under torchrun with 2 ranks: tiny Mixtral and Qwen3-MoE at EP=2 (experts split over the
two data-parallel ranks, all-gather token dispatcher on gloo), TP=2 and PP=2, logits against
transformers' reference; each saved back from EP=2 into <root>/<family>_ep2; then `prune` of
each (8 -> 4 experts, half the expert width) at EP=2 into <root>/<family>_pruned_ep2 and at TP=2
(experts' width split over the two ranks) into <root>/<family>_pruned_tp2."""

import sys

import torch

from nemo_minitron.config.schema import (DataConfig, ModelConfig, ParallelConfig, PruneConfig,
                                         PruneJob, Targets)
from nemo_minitron.pruning.run import prune
from nemo_minitron.runtime import dist
from nemo_minitron.runtime.forward import gather_logits, run_forward
from nemo_minitron.runtime.shard import load_checkpoint, save_checkpoint

from tests.workers._emit import emit

FAMILIES = ("mixtral", "qwen3_moe")


def prune_job(root, fam, data_prefix, ep, tp=1):
    return PruneJob(model=ModelConfig(name=fam, checkpoint=f"{root}/{fam}"),
                    parallel=ParallelConfig(ep=ep, tp=tp),
                    data=DataConfig(prefix=data_prefix, seq_length=32, valid_fraction=0.1),
                    prune=PruneConfig(target=Targets(num_experts=4, ffn_hidden_size=32,
                                                               hidden_size=96),
                                      calib_samples=8, micro_batch_size=2),
                    output=f"{root}/{fam}_pruned_" + (f"tp{tp}" if tp > 1 else f"ep{ep}"))


def main(root, data_prefix):
    for name, tp, pp, ep in (("ep2", 1, 1, 2), ("tp2", 2, 1, 1), ("pp2", 1, 2, 1)):
        dist.init(tp, pp, ep=ep)
        for fam in FAMILIES:
            ref = torch.load(f"{root}/{fam}.pt")
            shard, c = load_checkpoint(f"{root}/{fam}")
            n_local = sum(1 for k in shard.model.state_dict()
                          if k.startswith("decoder.layers.0.mlp.experts.local_experts.")
                          and k.endswith("linear_fc1.weight"))
            outs = run_forward(shard, ref["batches"],
                               lambda lg, _: {"logits": gather_logits(lg, c.arch.vocab_size)})
            emit({"layout": name, "family": fam, "rank": torch.distributed.get_rank(),
                  "local_experts": n_local,
                  "max_dlogit": (outs[0]["logits"] - ref["logits"]).abs().max().item()
                  if outs else None})
            if name == "ep2":
                save_checkpoint(shard, f"{root}/{fam}_ep2")
    for fam in FAMILIES:
        for ep, tp in ((2, 1), (1, 2)):
            res = prune(prune_job(root, fam, data_prefix, ep=ep, tp=tp))
            emit({"layout": "prune_tp2" if tp > 1 else "prune_ep2", "family": fam,
                  **{k: v for k, v in res.items() if k != "checkpoint"}})
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])

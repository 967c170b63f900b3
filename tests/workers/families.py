"""Run under torchrun with 2 ranks: qwen3, nemotron, Phi-3 with LongRoPE (past its pretraining
context: the long factors) and Mistral with a sliding window at TP=2 and PP=2 (logits against transformers' reference), then `prune` of qwen3
and nemotron at TP=2 into <out>/<family>_tp2."""

import sys

import torch

from nemo_minitron.config.schema import (DataConfig, ModelConfig, ParallelConfig, PruneConfig,
                                         PruneJob, Targets)
from nemo_minitron.pruning.run import prune
from nemo_minitron.runtime import dist
from nemo_minitron.runtime.forward import gather_logits, run_forward
from nemo_minitron.runtime.shard import load_checkpoint

from tests.workers._emit import emit

FAMILIES = ("qwen3", "nemotron")
PARITY = FAMILIES + ("phi3_longrope", "mistral_swa")


def main(root, data_prefix):
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2)):
        dist.init(tp, pp)
        for fam in PARITY:
            ref = torch.load(f"{root}/{fam}.pt")
            shard, c = load_checkpoint(f"{root}/{fam}")
            outs = run_forward(shard, ref["batches"],
                               lambda lg, _: {"logits": gather_logits(lg, c.arch.vocab_size)})
            emit({"layout": name, "family": fam, "rank": torch.distributed.get_rank(),
                  "max_dlogit": (outs[0]["logits"] - ref["logits"]).abs().max().item()
                  if outs else None})
    for fam in FAMILIES:
        job = PruneJob(model=ModelConfig(name=fam, checkpoint=f"{root}/{fam}"),
                       parallel=ParallelConfig(tp=2, pp=1),
                       data=DataConfig(prefix=data_prefix, seq_length=32, valid_fraction=0.1),
                       prune=PruneConfig(target=Targets(hidden_size=96, ffn_hidden_size=160,
                                                                  num_attention_heads=2, num_layers=3),
                                         calib_samples=8, micro_batch_size=2),
                       output=f"{root}/{fam}_tp2")
        res = prune(job)
        emit({"layout": "prune_tp2", "family": fam,
              **{k: v for k, v in res.items() if k != "checkpoint"}})
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])

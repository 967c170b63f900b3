"""Run under torchrun with 2 ranks: `prune` at TP=2, PP=2 and DP=2 into <out>/<layout>."""

import sys


from nemo_minitron.config.schema import (DataConfig, ModelConfig, ParallelConfig, PruneConfig,
                                         PruneJob, Targets)
from nemo_minitron.pruning.run import prune

from tests.workers._emit import emit


def main(ckpt_dir, data_prefix, out):
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2), ("dp2", 1, 1)):
        job = PruneJob(model=ModelConfig(name="tiny", checkpoint=ckpt_dir),
                       parallel=ParallelConfig(tp=tp, pp=pp),
                       data=DataConfig(prefix=data_prefix, seq_length=32, valid_fraction=0.1),
                       prune=PruneConfig(target=Targets(hidden_size=96, ffn_hidden_size=160,
                                                                  num_attention_heads=2, num_query_groups=1,
                                                                  num_layers=3),
                                         calib_samples=8, micro_batch_size=2),
                       output=f"{out}/{name}")
        res = prune(job)
        emit({"layout": name, **{k: v for k, v in res.items() if k != "checkpoint"}})


if __name__ == "__main__":
    main(*sys.argv[1:])

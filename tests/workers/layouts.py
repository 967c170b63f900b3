"""Run under torchrun with 2 ranks: load one checkpoint at TP=2, PP=2 and DP=2 in turn.

For each layout: logits against the reference, validation loss over data-parallel-split batches,
and a save at that layout, with the ``Parallel`` context ``dist.init`` returned. Emits one row
per rank and layout. At TP=2 a sharded save too (``<name>_sharded``), counting the floating-point
tensors each save passes through all_gather; at PP=2 and DP=2 that sharded save is loaded again
and its logits compared with the model's.
"""

import contextlib
import sys

import torch

from nemo_minitron.evaluate.loss import validation_loss
from nemo_minitron.runtime import dist
from nemo_minitron.runtime.forward import gather_logits, run_forward
from nemo_minitron.runtime.parallel import current
from nemo_minitron.runtime.shard import load_checkpoint, save_checkpoint

from tests.workers._emit import emit


@contextlib.contextmanager
def counting_gathers():
    """Counts all_gather calls that carry floating-point tensors (weights; the small index
    entries travel as byte tensors through all_gather_object)."""
    real = torch.distributed.all_gather
    count = [0]

    def all_gather(parts, tensor, *a, **kw):
        count[0] += tensor.is_floating_point()
        return real(parts, tensor, *a, **kw)

    torch.distributed.all_gather = all_gather
    try:
        yield count
    finally:
        torch.distributed.all_gather = real


def both_saves(stage, out) -> dict:
    """The gathered and the sharded save of ``stage``: weight all_gathers of each."""
    gathers = {}
    for name, sharded in (("gathered", False), ("sharded", True)):
        with counting_gathers() as n:
            save_checkpoint(stage, out if not sharded else f"{out}_sharded",
                            provenance={"stage": "test"}, sharded=sharded)
        gathers[name] = n[0]
    return gathers


def logits_of(path, batch, vocab):
    stage, _ = load_checkpoint(path)
    outs = run_forward(stage, [batch], lambda lg, _: {"logits": gather_logits(lg, vocab)})
    return outs[0]["logits"] if outs else None


def max_delta(a, b):
    return None if a is None else (a - b).abs().max().item()


def odd_vocab(ckpt_dir, ref_path, out_root):
    """Tied embeddings, vocabulary 1001: padded rows at TP=2 must not leak into logits or loss;
    at PP=2 the last stage's copy of the embedding must equal the first stage's."""
    ref = torch.load(ref_path)
    for name, tp, pp in (("tp2_odd_vocab", 2, 1), ("pp2_tied", 1, 2)):
        dist.init(tp, pp)
        shard, c = load_checkpoint(ckpt_dir)
        outs = run_forward(shard, ref["batches"][:1],
                           lambda lg, _: {"logits": gather_logits(lg, c.arch.vocab_size)})
        val = validation_loss(shard, ref["batches"])
        emb = shard.model.embedding.word_embeddings.weight if shard.pre_process else \
            shard.model.output_layer.weight
        row = {"layout": name, "rank": torch.distributed.get_rank(), "val": val,
               "max_dlogit": (outs[0]["logits"] - ref["logits"]).abs().max().item() if outs else None,
               "padded_rows": emb.shape[0] * tp}
        if tp == 2:
            row["gathers"] = both_saves(shard, f"{out_root}/{name}")
        else:  # the TP=2 sharded save of the padded, tied vocabulary, at PP=2
            got = logits_of(f"{out_root}/tp2_odd_vocab_sharded", ref["batches"][0],
                            c.arch.vocab_size)
            row["sharded_dlogit"] = max_delta(got, outs[0]["logits"] if outs else None)
        emit(row)


def context(par) -> dict:
    """What the test checks of a ``Parallel``: its numbers, and whether its groups are the live
    ones (of the sizes it claims)."""
    sizes = {g: torch.distributed.get_world_size(getattr(par, f"{g}_group"))
             for g in ("tp", "pp", "dp")}
    return {"tp": par.tp, "pp": par.pp, "dp": par.dp, "rank": par.rank,
            "world_size": par.world_size, "tp_rank": par.tp_rank, "pp_rank": par.pp_rank,
            "dp_rank": par.dp_rank, "is_rank0": par.is_rank0, "first_stage": par.first_stage,
            "last_stage": par.last_stage, "layout": par.layout, "device": par.device,
            "group_sizes": sizes, "same_as_current": par == current()}


def main(ckpt_dir, ref_path, out_root, odd_ckpt, odd_ref):
    odd_vocab(odd_ckpt, odd_ref, out_root)
    ref = torch.load(ref_path)
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2), ("dp2", 1, 1)):
        par = dist.init(tp, pp)
        shard, c = load_checkpoint(ckpt_dir)
        batches = ref["batches"]
        outs = run_forward(shard, batches[:1],
                           lambda lg, _: {"logits": gather_logits(lg, c.arch.vocab_size)})
        delta = (outs[0]["logits"] - ref["logits"]).abs().max().item() if outs else None
        mine = batches[par.dp_rank::par.dp]
        val = validation_loss(shard, mine)
        row = {"layout": name, "rank": torch.distributed.get_rank(), "max_dlogit": delta,
               "val": val, "par": context(par)}
        if tp == 2:
            row["gathers"] = both_saves(shard, f"{out_root}/{name}")
        else:
            save_checkpoint(shard, f"{out_root}/{name}", provenance={"shard": "test"})
            got = logits_of(f"{out_root}/tp2_sharded", batches[0], c.arch.vocab_size)
            row["sharded_dlogit"] = max_delta(got, outs[0]["logits"] if outs else None)
        emit(row)
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Depth by LM loss: skipping a block at forward time equals building the model without it."""

import torch

from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.evaluate.loss import validation_loss
from nemo_minitron.pruning.apply import apply_plan
from nemo_minitron.pruning.depth import best_block, block_removal_losses
from nemo_minitron.pruning.plan import identity_plan, Plan
from nemo_minitron.runtime.shard import build_shard, load_state

from tests.helpers import tiny_hf


def batches(vocab, n=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 16), generator=g)
        out.append({"tokens": ids, "position_ids": torch.arange(16).expand(2, 16),
                    "labels": torch.roll(ids, -1, 1), "loss_mask": torch.ones(2, 16)})
    return out


def rebuilt_without(arch, sd, start, n):
    """A stage built from scratch without layers [start, start+n), via plan + apply."""
    full = identity_plan(arch)
    keep = [i for i in range(arch.num_layers) if not start <= i < start + n]
    plan = Plan(arch, full.hidden, full.ffn[0], full.groups[0], full.heads[0], keep)
    small = build_shard(plan.target)
    load_state(small, apply_plan(plan, sd).__getitem__)
    return small


def test_block_removal_matches_rebuilt_models(single_rank):
    hf = tiny_hf("gqa")
    arch = arch_from_hf_config(hf.config)
    shard = build_shard(arch)
    sd = hf.state_dict()
    load_state(shard, sd.__getitem__)
    b = batches(arch.vocab_size)
    curve = block_removal_losses(shard, b, 2, progress=False)
    assert len(curve) == 3
    for start, loss in enumerate(curve):
        assert abs(validation_loss(rebuilt_without(arch, sd, start, 2), b)["loss"] - loss) < 1e-5
    # the model is intact afterwards
    assert len(shard.model.decoder.layers) == 4


def test_best_block():
    assert best_block([3.0, 1.0, 2.0], 2, 4) == [0, 3]


def test_block_removal_accuracy_matches_rebuilt_models(single_rank, tmp_path):
    import json

    from tests.helpers import tiny_tokenizer
    from nemo_minitron.evaluate.multiple_choice import accuracy, score_items
    from nemo_minitron.evaluate.tasks import load_task
    from nemo_minitron.pruning.depth import block_removal_accuracy

    rows = [{"context": f"w{i} w{i + 1}", "choices": [f" w{i + 2}", f" w{i + 7} w9"], "label": i % 2}
            for i in range(2, 14)]
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    items = load_task(f"jsonl:{path}")
    hf = tiny_hf("gqa")
    arch = arch_from_hf_config(hf.config)
    sd = hf.state_dict()
    shard = build_shard(arch)
    load_state(shard, sd.__getitem__)
    tok = tiny_tokenizer()
    accs = block_removal_accuracy(shard, tok, items, 3, progress=False)
    assert len(accs) == 2
    for start, acc in enumerate(accs):
        small = rebuilt_without(arch, sd, start, 3)
        assert accuracy(items, score_items(small, tok, items, progress=False))["acc_norm"] == acc

"""Depth by LM loss: skipping a block at forward time equals building the model without it."""

import torch

from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.evaluate.loss import validation_loss
from nemo_minitron.pruning.apply import apply_plan
from nemo_minitron.pruning.depth import best_block, block_removal_losses
from nemo_minitron.pruning.plan import identity_plan, Plan
from nemo_minitron.runtime.stage import build_stage, load_state

from conftest import tiny_hf


def batches(vocab, n=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 16), generator=g)
        out.append({"tokens": ids, "position_ids": torch.arange(16).expand(2, 16),
                    "labels": torch.roll(ids, -1, 1), "loss_mask": torch.ones(2, 16)})
    return out


def test_block_removal_matches_rebuilt_models(single_rank):
    hf = tiny_hf("gqa")
    arch = arch_from_hf_config(hf.config)
    stage = build_stage(arch)
    sd = hf.state_dict()
    load_state(stage, sd.__getitem__)
    b = batches(arch.vocab_size)
    curve = block_removal_losses(stage, b, 2, progress=False)
    assert len(curve) == 3
    full = identity_plan(arch)
    for start, loss in enumerate(curve):
        keep = [i for i in range(4) if not start <= i < start + 2]
        plan = Plan(arch, full.hidden, full.ffn[0], full.groups[0], full.heads[0], keep)
        small = build_stage(plan.target)
        load_state(small, apply_plan(plan, sd).__getitem__)
        assert abs(validation_loss(small, b)["loss"] - loss) < 1e-5
    # the model is intact afterwards
    assert len(stage.model.decoder.layers) == 4


def test_best_block():
    assert best_block([3.0, 1.0, 2.0], 2, 4) == [0, 3]

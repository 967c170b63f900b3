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


def test_prune_stage_scores_blocks_by_lm_loss_on_one_pass(tmp_path, monkeypatch, caplog):
    """prune.depth=lm_loss through the stage: every contiguous block is scored on the held-out
    split, at most one pass of it however large prune.depth_batches is (more would repeat the
    same batches), and the cheapest block is the one dropped."""
    import logging

    from nemo_minitron.config.schema import PruneConfig, PruneJob
    from nemo_minitron.convert import checkpoint as ckpt
    from nemo_minitron.data.packed import PackedSequences
    from nemo_minitron.pruning import depth as depth_mod
    from nemo_minitron.pruning.plan import Plan
    from nemo_minitron.pruning.run import prune
    from nemo_minitron.pruning.select import Targets
    from tests.helpers.corpus import tiny_workspace
    from tests.helpers.jobs import tiny_job_parts

    tiny_workspace(tmp_path)
    parts = tiny_job_parts(tmp_path)
    seen = []
    original = depth_mod.block_removal_losses
    monkeypatch.setattr(depth_mod, "block_removal_losses",
                        lambda stage, vb, *a, **k: seen.append(len(vb)) or original(stage, vb, *a, **k))
    job = PruneJob(model=parts["model"], data=parts["data"], output=str(tmp_path / "pruned"),
                   prune=PruneConfig(calib_samples=8, micro_batch_size=2, depth="lm_loss",
                                     depth_batches=1000, target=Targets(num_layers=2)))
    with caplog.at_level(logging.INFO, logger="nemo_minitron.pruning.run"):
        prune(job)
    d = parts["data"]
    one_pass = len(PackedSequences(d.prefix, d.seq_length, split="valid",
                                   valid_fraction=d.valid_fraction)) // 2
    assert seen == [one_pass] and 1 <= one_pass < 1000
    assert f"prune.depth_batches=1000: the held-out split holds {one_pass}" in caplog.text
    plan = Plan.load(tmp_path / "pruned" / "plan.json")
    layers = ckpt.Checkpoint(tmp_path / "teacher").arch.num_layers
    meta = plan.meta["depth_lm_loss"]
    curve = meta["loss_by_start"]
    assert meta["block"] == layers - 2 and len(curve) == 3  # every start of a block of layers-2
    start = curve.index(min(curve))
    assert plan.layers == [i for i in range(layers) if not start <= i < start + layers - 2]

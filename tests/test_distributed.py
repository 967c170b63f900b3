"""Multi-process (gloo, torchrun, 2 ranks): the same model at TP=2, PP=2 and DP=2.

One launch covers all three layouts (megatron's groups are rebuilt between them) to pay the
megatron-core import once. Checks logit parity with transformers, that validation loss matches the
single-process figure, and that checkpoints saved at each layout hold the original tensors.
"""

import pytest
import torch

from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.convert.hf_config import arch_from_hf_config

from tests.helpers import tiny_hf, torchrun

pytestmark = pytest.mark.multirank


def reference(hf, arch, tmp, name):
    """Save a checkpoint of ``hf`` and its logits/loss on 4 random batches; returns the mean loss."""
    ckpt.save(tmp / name, arch, hf.state_dict(), provenance={"stage": "test"})
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, arch.vocab_size, (2, 32), generator=g)
        batches.append({"tokens": ids, "position_ids": torch.arange(32).expand(2, 32),
                        "labels": torch.randint(0, arch.vocab_size, (2, 32), generator=g),
                        "loss_mask": torch.ones(2, 32)})
    with torch.no_grad():
        logits = hf(batches[0]["tokens"]).logits
        losses = [torch.nn.functional.cross_entropy(hf(b["tokens"]).logits.flatten(0, 1),
                                                    b["labels"].flatten()) for b in batches]
    torch.save({"batches": batches, "logits": logits}, tmp / f"{name}.pt")
    return torch.tensor([x.item() for x in losses]).mean().item()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layouts")
    hf = tiny_hf("head_dim")  # GQA + head_dim != hidden/heads + untied: the hardest mapping
    ref_loss = reference(hf, arch_from_hf_config(hf.config), tmp, "ckpt")
    odd = tiny_hf("odd_vocab")
    odd_loss = reference(odd, arch_from_hf_config(odd.config), tmp, "odd")
    out = torchrun("layouts", 2, tmp / "ckpt", tmp / "ckpt.pt", tmp / "saved", tmp / "odd",
                   tmp / "odd.pt")
    return {"rows": out, "ref_loss": ref_loss, "odd_loss": odd_loss, "sd": hf.state_dict(),
            "tmp": tmp}


def test_padded_vocab_under_tp(results):
    rows = [r for r in results["rows"] if r["layout"] == "tp2_odd_vocab"]
    assert len(rows) == 2 and rows[0]["padded_rows"] == 1024  # 1001 -> next multiple of 128*tp
    assert max(r["max_dlogit"] for r in rows) <= 1e-4
    assert abs(rows[0]["val"]["loss"] - results["odd_loss"]) < 1e-4


def test_tied_embeddings_under_pp(results):
    rows = [r for r in results["rows"] if r["layout"] == "pp2_tied"]
    assert len(rows) == 2
    assert max(r["max_dlogit"] for r in rows if r["max_dlogit"] is not None) <= 1e-4
    assert all(abs(r["val"]["loss"] - results["odd_loss"]) < 1e-4 for r in rows)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_logit_parity(results, layout):
    deltas = [r["max_dlogit"] for r in results["rows"] if r["layout"] == layout
              and r["max_dlogit"] is not None]
    assert deltas, f"no rank of {layout} produced logits"
    assert max(deltas) <= 1e-4, f"{layout}: {deltas}"


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_validation_loss_agrees(results, layout):
    vals = [r["val"] for r in results["rows"] if r["layout"] == layout]
    assert len(vals) == 2 and vals[0] == vals[1], "ranks disagree"
    assert vals[0]["tokens"] == 4 * 2 * 32
    assert abs(vals[0]["loss"] - results["ref_loss"]) < 1e-4


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_checkpoint_saved_at_layout_holds_original_tensors(results, layout):
    c = ckpt.Checkpoint(results["tmp"] / "saved" / layout)
    assert set(c.keys()) == set(results["sd"])
    for k, v in results["sd"].items():
        assert torch.equal(c.get(k), v), k
    shards = set(c.weight_map.values())
    assert len(shards) == (2 if layout == "pp2" else 1)


@pytest.mark.parametrize("layout,tp,pp", [("tp2", 2, 1), ("pp2", 1, 2), ("dp2", 1, 1)])
def test_init_returns_the_layouts_parallel_context(results, layout, tp, pp):
    rows = {r["rank"]: r["par"] for r in results["rows"] if r["layout"] == layout}
    assert set(rows) == {0, 1}
    dp = 2 // (tp * pp)
    for rank, par in rows.items():
        assert par["layout"] == {"tp": tp, "pp": pp, "dp": dp}
        assert (par["tp"], par["pp"], par["dp"], par["world_size"]) == (tp, pp, dp, 2)
        assert par["group_sizes"] == {"tp": tp, "pp": pp, "dp": dp}
        assert par["rank"] == rank and par["is_rank0"] == (rank == 0)
        assert par["tp_rank"] == (rank if tp == 2 else 0)
        assert par["pp_rank"] == (rank if pp == 2 else 0)
        assert par["dp_rank"] == (rank if dp == 2 else 0)
        assert par["first_stage"] == (par["pp_rank"] == 0)
        assert par["last_stage"] == (par["pp_rank"] == pp - 1)
        assert par["device"] == "cpu" and par["same_as_current"]


def test_sharded_save_gathers_no_weights(results):
    """At TP=2 the gathered save passes weights through all_gather, the sharded one none."""
    rows = [r for r in results["rows"] if r["layout"] in ("tp2", "tp2_odd_vocab")]
    assert len(rows) == 4
    for r in rows:
        assert r["gathers"]["sharded"] == 0 and r["gathers"]["gathered"] > 0, r


@pytest.mark.parametrize("name", ["tp2", "tp2_odd_vocab"])
def test_sharded_save_holds_the_gathered_tensors_and_loads_at_other_layouts(results, name):
    """Each TP rank's file holds its slices (padded vocabulary rows dropped); read whole they
    are the tensors of the gathered save, and loaded at PP=2 / DP=2 the logits are the same."""
    from nemo_minitron.convert import sharded

    c = ckpt.Checkpoint(results["tmp"] / "saved" / f"{name}_sharded").verify()
    assert c.sharded is not None and not (c.path / ckpt.INDEX).exists()
    assert c.files() == ["model-tp0-pp0.safetensors", "model-tp1-pp0.safetensors"]
    gathered = ckpt.Checkpoint(results["tmp"] / "saved" / name)
    assert sorted(c.keys()) == sorted(gathered.keys())
    for k in c.keys():
        assert torch.equal(c.get(k), gathered.get(k)), k
    embed = c.sharded.tensors["model.embed_tokens.weight"]
    assert embed["dim"] == 0 and [p["stop"] for p in embed["pieces"]][-1] == c.arch.vocab_size
    assert sharded.ShardedTensors(c.path).layout == {"tp": 2, "pp": 1}
    after = {"tp2": ("pp2", "dp2"), "tp2_odd_vocab": ("pp2_tied",)}[name]
    deltas = [r["sharded_dlogit"] for r in results["rows"] if r["layout"] in after
              and r["sharded_dlogit"] is not None]
    assert len(deltas) == len(after) + (1 if name == "tp2" else 0)  # PP=2: the last stage's
    assert max(deltas) <= 1e-6

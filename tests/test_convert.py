"""Hugging Face -> our checkpoint -> Hugging Face: plain from_pretrained loads it, logits identical."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.convert.hf import export_hf, import_hf
from nemo_minitron.convert.hf_config import export_model_type


@pytest.mark.parametrize("kind", ["gqa", "tied", "head_dim", "llama3_rope", "qwen2", "qwen3",
                                  "nemotron"])
def test_round_trip(hf_dir, tmp_path, kind):
    src, model = hf_dir(kind)
    ours = import_hf(str(src), tmp_path / "ours")
    c = ckpt.Checkpoint(ours)
    assert c.meta["source"] == str(src) and c.arch.num_params() == sum(
        p.numel() for p in model.parameters())
    out = export_hf(str(ours), tmp_path / "hf_out")
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 1000, (2, 20))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    text = "w5 w7 w999"
    assert (AutoTokenizer.from_pretrained(out)(text)["input_ids"]
            == AutoTokenizer.from_pretrained(src)(text)["input_ids"])


def test_pruned_shape_exports_as_mistral(hf_dir, tmp_path):
    """hidden != heads*head_dim (what width pruning produces) must still load in stock transformers."""
    src, model = hf_dir("gqa")
    ours = import_hf(str(src), tmp_path / "ours")
    c = ckpt.Checkpoint(ours)
    keep = torch.arange(0, 128, 2)  # drop every other hidden channel
    t = c.tensors()
    for k in list(t):
        if k.endswith(("norm.weight", "layernorm.weight")):
            t[k] = t[k][keep]
        elif k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
                         "up_proj.weight")) or k in ("model.embed_tokens.weight", "lm_head.weight"):
            t[k] = t[k][:, keep]
        elif k.endswith(("o_proj.weight", "down_proj.weight")):
            t[k] = t[k][keep]
    arch = c.arch.replace(hidden_size=64)
    assert export_model_type(arch) == "mistral"
    ckpt.save(tmp_path / "pruned", arch, t)
    out = export_hf(str(tmp_path / "pruned"), tmp_path / "pruned_hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "mistral"
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.head_dim == 32 and m.config.hidden_size == 64
    assert sum(p.numel() for p in m.parameters()) == arch.num_params()


def test_refuses_to_overwrite(hf_dir, tmp_path):
    src, _ = hf_dir("gqa")
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        import_hf(str(src), tmp_path / "ours")
    assert (tmp_path / "ours" / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_incomplete_checkpoint_names_what_is_missing(hf_dir, tmp_path):
    src, _ = hf_dir("gqa")
    ours = import_hf(str(src), tmp_path / "ours")
    (ours / "arch.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing arch.json"):
        ckpt.Checkpoint(ours)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.Checkpoint(tmp_path / "nope")


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_hf(str(tmp_path / "nothing.gguf"), tmp_path / "x")


@pytest.mark.parametrize("kind", ["gqa", "odd_vocab", "qwen2", "nemotron"])
def test_sharded_layout_reads_back_at_any_split(tmp_path, kind):
    """Each TP=2 rank's canonical slices written as a sharded checkpoint (what a sharded save
    writes, here without process groups): read whole, every tensor is what the gathered save
    writes (padded vocabulary rows dropped); read as 4 TP parts, each costs its own bytes only."""
    from nemo_minitron.convert import sharded
    from nemo_minitron.convert.hf_config import arch_from_hf_config
    from nemo_minitron.convert.weights import canonical_shapes, from_megatron, to_megatron

    from tests.helpers import tiny_hf

    hf = tiny_hf(kind)
    arch, sd = arch_from_hf_config(hf.config), hf.state_dict()
    shapes, layers = canonical_shapes(arch), range(arch.num_layers)
    entries, megs = [], []
    for r in range(2):
        megs.append(to_megatron(sd.__getitem__, arch, tp_rank=r, tp_size=2, layers=layers,
                                pre_process=True, post_process=True))
        local = from_megatron(megs[-1:], arch, layers=layers, pre_process=True, post_process=True,
                              tp_size=2)
        entries.append(sharded.write_pieces(tmp_path, sharded.piece_file(r, 0),
                                            sharded.pieces(local, shapes, r)))
    ckpt.write_description(tmp_path, arch, {"stage": "test"})
    sharded.write_index(tmp_path, sharded.merge(entries, shapes), {"tp": 2, "pp": 1})
    c = ckpt.Checkpoint(tmp_path).verify()
    assert sorted(c.keys()) == sorted(shapes) and c.files() == ["model-tp0-pp0.safetensors",
                                                                "model-tp1-pp0.safetensors"]
    gathered = from_megatron(megs, arch, layers=layers, pre_process=True, post_process=True)
    for k in shapes:
        assert torch.equal(c.get(k), gathered[k]), k
    q = "model.layers.0.self_attn.q_proj.weight"
    before = c.bytes_read
    part = c.get_part(q, 1, 3, 4)  # across the pieces' split: a quarter of each piece
    assert torch.equal(part, torch.chunk(sd[q], 4, dim=1)[3])
    assert c.bytes_read - before == sd[q].numel() * 4 // 4
    for dim in (0, 1):
        for r in range(4):
            assert torch.equal(c.get_part(q, dim, r, 4), torch.chunk(sd[q], 4, dim=dim)[r])
    bad = json.loads((tmp_path / sharded.INDEX).read_text())
    bad["tensors"][q]["pieces"].pop()
    (tmp_path / sharded.INDEX).write_text(json.dumps(bad))
    with pytest.raises(ckpt.CheckpointError, match="pieces cover"):
        ckpt.Checkpoint(tmp_path).verify()

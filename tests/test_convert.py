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

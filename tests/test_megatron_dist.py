"""megatron-core distributed checkpoints (torch_dist) in and out (issue 20).

Multi-rank: one torchrun launch (4 ranks, gloo) writes checkpoints at TP=2/PP=2 with our export and
with plain megatron-core (bare, and in Megatron-LM's layout with ``args``), imports them at TP=1,
exports the imported model at TP=1 and loads that with plain megatron-core at TP=2/PP=2
(tests/workers/megatron_dist.py). Single-process: the architecture record, restricted reads of
untrusted files, user errors.
"""

import json
import pickle
from argparse import Namespace

import pytest
import torch

from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.convert.dcp_reader import DcpReader, read_metadata
from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.convert.megatron_args import arch_fields_from_args
from nemo_minitron.convert.megatron_dist import find_checkpoint, import_megatron, read_common
from nemo_minitron.convert.weights import canonical_keys
from nemo_minitron.runtime.megatron_save import export_megatron

from tests.helpers import tiny_hf, torchrun


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_dist")
    hf = tiny_hf("head_dim")  # GQA, head_dim != hidden/heads, untied
    ckpt.save(root / "src", arch_from_hf_config(hf.config), hf.state_dict(),
              provenance={"stage": "test"})
    rows = torchrun("megatron_dist", 4, root)
    (root / "rows.json").write_text(json.dumps(rows))
    return root


def _logits(root, name):
    return torch.load(root / f"logits_{name}.pt", weights_only=True)


@pytest.mark.multirank
def test_our_export_at_tp2pp2_imports_at_tp1_with_equal_logits(layouts):
    ref = _logits(layouts, "src")
    assert ref.shape == (2, 16, 1000)
    torch.testing.assert_close(_logits(layouts, "ours_tp1"), ref, atol=1e-6, rtol=0)
    a, b = ckpt.Checkpoint(layouts / "src"), ckpt.Checkpoint(layouts / "ours_imported")
    assert b.arch == a.arch
    for k in canonical_keys(a.arch):
        assert torch.equal(a.get(k), b.get(k)), k


@pytest.mark.multirank
@pytest.mark.parametrize("name", ["plain", "mlm"])
def test_plain_megatron_save_imports_with_equal_logits(layouts, name):
    """A GPTModel built and saved by megatron-core alone: bare (architecture from the overrides)
    and in Megatron-LM's layout (iter_0000100 + tracker, architecture from its args)."""
    torch.testing.assert_close(_logits(layouts, f"{name}_tp1"), _logits(layouts, "plain"),
                               atol=1e-6, rtol=0)
    c = ckpt.Checkpoint(layouts / f"{name}_imported")
    assert (c.arch.num_layers, c.arch.hidden_size, c.arch.head_dim, c.arch.num_query_groups) == (4, 128, 48, 2)
    want = "Megatron-LM args" if name == "mlm" else "tensor shapes + model.arch"
    assert want in c.meta["arch_from"]
    assert c.meta["iteration"] == (100 if name == "mlm" else None)


@pytest.mark.multirank
def test_exported_student_loads_in_plain_megatron_at_another_layout(layouts):
    """Exported at TP=1 by us, loaded at TP=2/PP=2 by dist_checkpointing.load into a GPTModel:
    the same layout as the model first saved, so the logits are bitwise those of that model."""
    assert torch.equal(_logits(layouts, "student"), _logits(layouts, "plain"))
    assert (layouts / "student" / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert find_checkpoint(layouts / "student") == layouts / "student" / "release"
    common, _ = read_common(layouts / "student" / "release")
    assert "args" not in common  # megatron-core's weights_only load of common.pt would refuse it
    assert common["minitron_arch"] == ckpt.Checkpoint(layouts / "plain_imported").arch.to_dict()


@pytest.mark.multirank
def test_sliced_read_touches_only_overlapping_chunks(layouts):
    """Saved at TP=2: the first half of the QKV rows of one layer lies in one chunk of four."""
    r = DcpReader(layouts / "ours" / "release")
    key = "decoder.layers.self_attention.linear_qkv.weight"
    full = r.read(key)
    r.bytes_read = 0
    half = r.read(key, (slice(1, 2), slice(0, full.shape[1] // 2)))
    assert torch.equal(half, full[1:2, : full.shape[1] // 2])
    assert 0 < r.bytes_read < full.numel() * full.element_size() / 4  # one of 8 chunks


@pytest.mark.multirank
def test_tp_ranks_read_only_their_slices(layouts):
    """Loading our checkpoint at TP=2/PP=2, a rank reads its stage's half of each sharded tensor
    (safetensors slicing), not whole tensors: about a quarter of the file each, all of it together."""
    c = ckpt.Checkpoint(layouts / "src")
    total = sum(c.get(k).numel() * 4 for k in c.keys())
    got = [r["src_bytes_read"] for r in json.loads((layouts / "rows.json").read_text())]
    assert len(got) == 4
    assert all(b < 0.3 * total for b in got), (got, total)
    assert total <= sum(got) < 1.01 * total  # only the replicated norms are read twice


class _Boom:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.multirank
def test_untrusted_pickles_are_refused(tmp_path, layouts):
    d = tmp_path / "evil"
    d.mkdir()
    for f in ("metadata.json", ".metadata", "common.pt"):
        (d / f).write_bytes((layouts / "plain" / f).read_bytes())
    (d / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(ValueError, match="builtins.print"):
        read_metadata(d / ".metadata")
    torch.save({"args": _Boom()}, d / "common.pt")
    common, why = read_common(d)
    assert common == {} and "weights_only" in why


@pytest.mark.multirank
def test_missing_architecture_names_the_fields(tmp_path, layouts):
    with pytest.raises(ValueError, match=r"\+model\.arch\.num_attention_heads=.*num_query_groups"):
        import_megatron(str(layouts / "plain"), tmp_path / "out")
    with pytest.raises(ValueError, match="num_query_groups"):  # wrong override: shapes disagree
        import_megatron(str(layouts / "plain"), tmp_path / "out", arch_overrides={
            "num_attention_heads": 4, "num_query_groups": 4, "head_dim": 48})
    assert not (tmp_path / "out").exists()


def test_unsupported_megatron_lm_settings_are_named():
    with pytest.raises(ValueError, match="args.num_experts=8"):
        arch_fields_from_args(Namespace(num_layers=2, swiglu=True, num_experts=8))


def test_not_a_megatron_checkpoint(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(ValueError, match="iter_0000005 has no metadata.json"):
        find_checkpoint(tmp_path)


@pytest.mark.multirank
def test_export_refuses_to_overwrite(tmp_path, layouts):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    with pytest.raises(FileExistsError):
        export_megatron(layouts / "src", tmp_path / "out")
    assert (tmp_path / "out" / "x").read_text() == "keep"


@pytest.mark.multirank
def test_cli_export_format_megatron_then_import(layouts, tmp_path):
    """`minitron export format=megatron` and `minitron import` of what it wrote, as processes."""
    from tests.test_cli import minitron

    p = minitron("export", f"model.checkpoint={layouts / 'src'}", f"output={tmp_path}/meg",
                 "format=megatron")
    assert p.returncode == 0, p.stderr[-2000:]
    p = minitron("import", f"model.source={tmp_path}/meg", f"output={tmp_path}/back")
    assert p.returncode == 0, p.stderr[-2000:]
    a, b = ckpt.Checkpoint(layouts / "src"), ckpt.Checkpoint(tmp_path / "back")
    assert b.arch == a.arch and b.meta["arch_from"] == "the checkpoint's minitron_arch"
    for k in canonical_keys(a.arch):
        assert torch.equal(a.get(k), b.get(k)), k

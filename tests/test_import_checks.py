"""`minitron import` of a damaged or inconsistent Hugging Face directory is refused before any
weight is read, with one line naming the file (``convert/hf_checks.py``, called by the import's
preflight): shapes that disagree with config.json, cut or garbage weight files, a broken index,
config fields of the wrong type, a pickled class in a ``.bin``, a tokenizer that does not load,
and an import without output= that would replace the embedded default teacher.

The CLI runs in this process, as in ``tests/test_bad_inputs.py``; the fixtures are the tiny models
of ``tests.helpers.models`` saved by transformers, then damaged.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from nemo_minitron.cli.main import main as cli_main
from nemo_minitron.runtime import model as rmodel
from tests.helpers.models import tiny_hf, tiny_tokenizer


class NotATensor:
    """A class outside torch's weights-only allowlist, pickled into a .bin."""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Valid tiny Hugging Face directories: kind -> path."""
    root = tmp_path_factory.mktemp("import_checks")
    out = {}
    for kind in ("gqa", "phi3", "qwen3_moe"):
        out[kind] = root / kind
        tiny_hf(kind).save_pretrained(out[kind])
        tiny_tokenizer().save_pretrained(out[kind])
    out["sharded"] = root / "sharded"
    tiny_hf("gqa").save_pretrained(out["sharded"], max_shard_size="1MB")
    tiny_tokenizer().save_pretrained(out["sharded"])
    assert (out["sharded"] / "model.safetensors.index.json").is_file()
    return out


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    monkeypatch.setenv("NEMO_MINITRON_CACHE", str(tmp_path / "cache"))  # the default teacher's
    return d


def _cli(argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() rewrites it for Hydra
    root_log = logging.getLogger()  # and Hydra points the root logger at this test's capture
    monkeypatch.setattr(root_log, "handlers", list(root_log.handlers))
    return cli_main(["import", *argv])


def refused(argv, words, tmp_path, monkeypatch, capsys, output=True):
    """The import is refused with one line holding ``words``, no model built, nothing written."""
    out = tmp_path / "out" / "ck"
    built = rmodel.models_built
    with pytest.raises(SystemExit) as exit_info:
        _cli([*argv, *([f"output={out}"] if output else [])], monkeypatch)
    err = capsys.readouterr().err
    assert exit_info.value.code not in (0, None), err
    *progress, msg = [x for x in err.splitlines() if x.strip()] or [""]
    assert msg.startswith("minitron import: error: "), err
    assert all("[00:" in x for x in progress), err  # one line, after progress bars at most
    for w in words:
        assert w in msg, f"{w!r} not in: {msg}"
    assert "Traceback" not in err and "allowlist" not in msg and "safe_globals" not in msg
    assert rmodel.models_built == built, "a model was built before the request was refused"
    assert not (tmp_path / "out").exists()
    assert list((tmp_path / "cwd").iterdir()) == []
    assert not (tmp_path / "cache").exists(), "the default teacher's directory was touched"
    return msg


def damaged(models, kind, tmp_path, damage) -> Path:
    d = shutil.copytree(models[kind], tmp_path / f"bad_{kind}")
    damage(d)
    return d


def config(**fields):
    def damage(d):
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **fields}))
    return damage


def tensor(name, cut):
    """Rewrite model.safetensors with tensor ``name`` cut to ``cut`` (an index of it)."""
    def damage(d):
        state = load_file(d / "model.safetensors")
        state[name] = state[name][cut].clone()
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    return damage


def retype(name, change):
    """Rewrite model.safetensors with tensor ``name`` replaced by ``change(tensor)``."""
    def damage(d):
        state = load_file(d / "model.safetensors")
        state[name] = change(state[name].clone())
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    return damage


def _nan_at_3(t):
    t.view(-1)[3] = float("nan")
    return t


def truncate(name, keep):
    def damage(d):
        f = d / name
        data = f.read_bytes()
        f.write_bytes(data[:keep(len(data))])
    return damage


def write(name, text):
    def damage(d):
        (d / name).write_text(text)
    return damage


def no_tokenizer(d):
    for f in d.glob("tokenizer*"):
        f.unlink()


def to_bin(d, **extra):
    """The weights as a PyTorch pytorch_model.bin in place of model.safetensors."""
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save({**state, **extra}, d / "pytorch_model.bin")


def pickled_class(d):
    to_bin(d, extra=NotATensor())


def then(*damages):
    def damage(d):
        for x in damages:
            x(d)
    return damage


Q = "model.layers.0.self_attn.q_proj.weight"
CASES = [
    # 1. shapes that disagree with config.json (imported with rc=0 before)
    ("q_proj_rows", "gqa", tensor(Q, slice(0, 64)),
     [Q, "(64, 128)", "(128, 128)", "num_attention_heads=4", "head_dim", "re-download"]),
    ("intermediate_size", "gqa", config(intermediate_size=300),
     ["mlp.gate_proj.weight has shape (256, 128)", "intermediate_size=300", "(300, 128)"]),
    ("head_dim", "gqa", config(head_dim=48), [Q, "head_dim=48", "(192, 128)"]),
    ("vocab_size", "gqa", config(vocab_size=1200),
     ["model.embed_tokens.weight has shape (1000, 128)", "vocab_size=1200", "(1200, 128)"]),
    ("phi3_fused_rows", "phi3", config(intermediate_size=300),
     ["mlp.gate_up_proj.weight has shape (512, 128)", "intermediate_size=300", "cannot split"]),
    ("phi3_fused_columns", "phi3",
     tensor("model.layers.0.self_attn.qkv_proj.weight", (slice(None), slice(0, 64))),
     [f"{Q} (split from model.layers.0.self_attn.qkv_proj.weight) has shape (128, 64)",
      "hidden_size=128", "(128, 128)"]),
    ("moe_expert_width", "qwen3_moe", config(moe_intermediate_size=32),
     ["experts.0.", "moe_intermediate_size=32", "(32, 128)"]),
    ("moe_expert_count", "qwen3_moe", config(num_local_experts=4),
     ["unexpected", "mlp.experts.4.", "expert counts"]),
    # 2. cut or garbage weight files, a broken index
    ("safetensors_data_cut", "gqa", truncate("model.safetensors", lambda n: n - 1000),
     ["model.safetensors", "not fully covered", "re-download it"]),
    ("safetensors_header_cut", "gqa", truncate("model.safetensors", lambda n: 40),
     ["model.safetensors", "re-download it"]),
    ("safetensors_garbage", "gqa", write("model.safetensors", "not weights " * 100),
     ["model.safetensors is damaged or not a safetensors file", "re-download it"]),
    ("index_not_json", "sharded", write("model.safetensors.index.json", "{weight_map"),
     ["model.safetensors.index.json is not a safetensors index", "re-download it"]),
    ("index_missing_shard", "sharded",
     lambda d: next(d.glob("model-00002-*.safetensors")).unlink(),
     ["model.safetensors.index.json names shard model-00002-", "re-download"]),
    # 3. config.json valid JSON but of the wrong kind or types
    ("config_list", "gqa", write("config.json", "[1, 2]"),
     ["config.json holds a JSON list, not an object"]),
    # imported and exported as I8; NaN weights were imported and exported
    ("int8_tensor", "gqa", retype(Q, lambda t: t.to(torch.int8)),
     [Q, "stored as I8", "not as floats"]),
    ("nan_weight", "gqa", retype(Q, _nan_at_3), [Q, "NaN or infinite values"]),
    ("config_null", "gqa", write("config.json", "null"), ["config.json holds a JSON null"]),
    # read as a Llama without a word: a family told by nothing
    ("no_model_type", "gqa", config(model_type=None, architectures=None),
     ["names no model_type", "\"model_type\": \"llama\""]),
    ("hidden_size_string", "gqa", config(hidden_size="128"),
     ["config.json", 'hidden_size="128" is a string', "must be an integer", '"hidden_size": 128']),
    ("eps_negative", "gqa", config(rms_norm_eps=-1), ["rms_norm_eps=-1 must be positive"]),
    ("eps_zero", "gqa", config(rms_norm_eps=0), ["rms_norm_eps=0 must be positive"]),
    # 4. a pickled class that torch's weights-only load refuses: convert, never allowlist
    ("bin_pickled_class", "gqa", pickled_class,
     ["pytorch_model.bin", "NotATensor", "convert the weights to safetensors"]),
    ("bin_cut", "gqa", then(to_bin, truncate("pytorch_model.bin", lambda n: n // 2)),
     ["pytorch_model.bin is a zip archive cut short", "re-download it"]),
    ("bin_garbage", "gqa", then(to_bin, write("pytorch_model.bin", "not weights")),
     ["pytorch_model.bin is not a PyTorch weights file", "re-download it"]),
    # 6. a tokenizer that does not load
    ("tokenizer_not_json", "gqa", write("tokenizer.json", '{"version": '),
     ["tokenizer.json does not read as JSON", "re-download it"]),
    ("tokenizer_broken", "gqa", write("tokenizer.json", '{"version": "1.0"}'),
     ["its tokenizer does not load", "re-download the tokenizer files"]),
    ("no_tokenizer", "gqa", no_tokenizer,
     ["has no tokenizer files", "copy the model's tokenizer files into it"]),
]


@pytest.mark.parametrize("kind,damage,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_damaged_source_is_refused_in_one_line(models, kind, damage, words, cwd, tmp_path,
                                               monkeypatch, capsys):
    src = damaged(models, kind, tmp_path, damage)
    refused([f"model.source={src}"], [*words], tmp_path, monkeypatch, capsys)


def test_import_without_output_does_not_replace_the_default_teacher(models, cwd, tmp_path,
                                                                    monkeypatch, capsys):
    """The default model.checkpoint is the embedded teacher every default run uses: an import
    of another source without output= suggested overwrite=true over it."""
    refused([f"model.source={models['gqa']}"],
            ["output=<dir> is required", f"model.source={models['gqa']}", "default teacher"],
            tmp_path, monkeypatch, capsys, output=False)


def test_default_output_only_for_the_defaults_own_source(tmp_path):
    from nemo_minitron.convert.hf_checks import default_output

    teacher, gguf = tmp_path / "teacher", tmp_path / "smollm2" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"")

    def job(source, checkpoint=teacher, output=None, gguf_file=None):
        return SimpleNamespace(output=output, model=SimpleNamespace(
            source=str(source), checkpoint=str(checkpoint), gguf_file=gguf_file))

    default_output(job(gguf), teacher, gguf)  # the installer's own import (`minitron import`)
    default_output(job(gguf.parent, gguf_file="model.gguf"), teacher, gguf)
    default_output(job(tmp_path, checkpoint=tmp_path / "ck"), teacher, gguf)  # model=<config>
    default_output(job(tmp_path, output=tmp_path / "out"), teacher, gguf)
    with pytest.raises(ValueError, match="output=<dir> is required"):
        default_output(job(tmp_path), teacher, gguf)


def test_loader_names_a_bin_with_a_pickled_class(models, tmp_path):
    """The loader itself (no preflight: python -m nemo_minitron.assets, notebooks) says the same
    in one line, without torch's advice to allowlist the class."""
    from nemo_minitron.convert.hf import import_hf

    src = damaged(models, "gqa", tmp_path, pickled_class)
    with pytest.raises(ValueError) as e:
        import_hf(str(src), str(tmp_path / "ck"))
    msg = str(e.value)
    assert "\n" not in msg and "pytorch_model.bin" in msg and "safetensors" in msg
    assert "allowlist" not in msg and "safe_globals" not in msg


@pytest.mark.parametrize("kind", ["gqa", "phi3", "sharded", "gqa_bin"])
def test_valid_sources_still_import(models, kind, cwd, tmp_path, monkeypatch, capsys):
    from nemo_minitron.convert import checkpoint as ckpt

    src = models.get(kind)
    if kind == "gqa_bin":  # a PyTorch .bin: its shapes are checked from a memory map
        src = damaged(models, "gqa", tmp_path, to_bin)
    out = tmp_path / "ck"
    _cli([f"model.source={src}", f"output={out}"], monkeypatch)
    ck = ckpt.Checkpoint(out).verify()
    assert ck.arch.hidden_size == 128 and ck.has_tokenizer


def test_int_eps_imports_as_a_float_and_exports(models, tmp_path):
    """rms_norm_eps=1 (an int) crashed only at export, in transformers' strict config class."""
    from nemo_minitron.convert import checkpoint as ckpt
    from nemo_minitron.convert.hf import export_hf, import_hf

    src = damaged(models, "gqa", tmp_path, config(rms_norm_eps=1))
    out = import_hf(str(src), str(tmp_path / "ck"))
    assert ckpt.Checkpoint(out).arch.norm_eps == 1.0
    back = export_hf(str(out), str(tmp_path / "hf"))
    assert json.loads((Path(back) / "config.json").read_text())["rms_norm_eps"] == 1.0

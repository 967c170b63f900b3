"""Checks of a Hugging Face model directory before `minitron import` reads its weights.

They read ``config.json``, the safetensors index, the safetensors headers (names, shapes) and
the tokenizer files -- a PyTorch ``.bin`` is memory-mapped, not read -- so a directory that
would fail after the weights loaded, or import into a checkpoint every later stage rejects,
is refused in a second with one line naming the file and the fix: config fields of the wrong
type, weights whose shapes disagree with the config, a truncated or garbage weight file, an
index naming a missing shard, a tokenizer that does not load. The tensors' names are mapped
by the loader's own functions (:func:`~.hf.to_canonical` on ``meta`` tensors, which have shapes
and no data), and their shapes compared with :func:`~.weights.canonical_shapes`.
"""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open

from ..arch import Arch
from ..families import family
from .fused import fused_names
from .hf import INDEX, check_names, load_bin, read_index, resolve_source, to_canonical, \
    weight_files
from .hf_config import _REQUIRED, arch_from_hf_config, hf_config_from_arch
from .weights import canonical_shapes

# config.json fields read as integers (those of _REQUIRED must be given; the others may be null)
_INTS = _REQUIRED + ("num_key_value_heads", "head_dim", "max_position_embeddings",
                     "moe_intermediate_size", "num_experts", "num_local_experts",
                     "num_experts_per_tok", "shared_expert_intermediate_size", "sliding_window",
                     "original_max_position_embeddings")
_FLOATS = ("rms_norm_eps", "norm_eps", "rope_theta", "partial_rotary_factor")
_POSITIVE = ("rms_norm_eps", "norm_eps", "rope_theta")
# files of which a Hugging Face tokenizer is made (one of them suffices to try a load)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "merges.txt", "spiece.model", "tiktoken.model")
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json")


def default_output(job, teacher: Path, teacher_source: Path) -> None:
    """Without output=, import writes model.checkpoint, which the default model config sets to
    the embedded default teacher (``teacher``) that every default run uses: only the import of
    its own source (``teacher_source``, the installer's) may write there."""
    if job.output or job.model.checkpoint is None:
        return
    real = lambda p: Path(p).expanduser().resolve()  # noqa: E731
    if real(job.model.checkpoint) != real(teacher):
        return  # another model config's checkpoint (model=llama3_1_8b): its own directory
    where, gguf = resolve_source(job.model.source, job.model.gguf_file)
    if real(Path(where) / gguf if gguf else where) == real(teacher_source):
        return
    raise ValueError(f"output=<dir> is required: without it model.source={job.model.source} "
                     f"would be written to model.checkpoint={job.model.checkpoint}, the embedded "
                     "default teacher every default run uses; pass output=<dir> for the imported "
                     "checkpoint")


def _kind(v) -> str:
    """How a JSON value reads: "a string", "null", ..."""
    kinds = {str: "a string", bool: "a boolean", float: "a float", list: "a list",
             dict: "an object", int: "an integer"}
    return "null" if v is None else kinds.get(type(v), type(v).__name__)


def _typed(d: dict, where: str, prefix: str = "") -> None:
    """The integer and float fields of config dict ``d`` have those types."""
    for k in _INTS:
        v = d.get(k)
        if k in d and not (isinstance(v, int) and not isinstance(v, bool)) and (
                v is not None or k in _REQUIRED):
            raise ValueError(f"{where}: {prefix}{k}={json.dumps(v)} is {_kind(v)}; it must be an "
                             f"integer: write it as a number, e.g. \"{k}\": {_example(v)}")
    for k in _FLOATS:
        v = d.get(k)
        if k in d and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"{where}: {prefix}{k}={json.dumps(v)} is {_kind(v)}; it must be a "
                             f"number, e.g. \"{k}\": {_example(v, 1e-05)}")
        if k in d and k in _POSITIVE and not v > 0:
            raise ValueError(f"{where}: {prefix}{k}={v} must be positive (e.g. \"{k}\": 1e-05 "
                             "for an eps); give the model's own value")


def _example(v, default=128):
    """The number a string field meant, where it is one; else ``default``."""
    try:
        x = float(v)
        return int(x) if isinstance(default, int) and x == int(x) else x
    except (TypeError, ValueError, OverflowError):
        return default


def config(local: Path) -> dict:
    """``config.json`` of directory ``local`` as a dict, its numeric fields of the right type."""
    path = local / "config.json"
    try:
        d = json.loads(path.read_text())
    except (ValueError, OSError) as e:  # not JSON, not UTF-8, unreadable
        raise ValueError(f"model.source={path} does not read as JSON ({e}); re-download it") \
            from None
    if not isinstance(d, dict):
        raise ValueError(f"model.source={path} holds a JSON {_kind(d).split()[-1]}, not an "
                         "object of settings; give the model's own config.json")
    where = f"model.source={path}"
    if not d.get("model_type") and not d.get("architectures"):  # it was read as llama
        raise ValueError(f"{where} names no model_type (nor architectures): the family cannot "
                         "be told; add it as the model's config has it, e.g. \"model_type\": "
                         "\"llama\"")
    _typed(d, where)
    for sub in ("rope_parameters", "rope_scaling"):
        if isinstance(d.get(sub), dict):
            _typed({k: v for k, v in d[sub].items() if k in _FLOATS}, where, f"{sub}.")
    return d


_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def _shapes_of(f: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape of weight file ``f``, from its header (a ``.bin``: mapped); None for
    an old (non-zip) ``.bin``, which cannot be mapped (the import reads it whole)."""
    if f.suffix == ".safetensors":
        try:
            with safe_open(str(f), framework="pt") as sf:
                slices = {k: sf.get_slice(k) for k in sf.keys()}
                shapes = {k: tuple(v.get_shape()) for k, v in slices.items()}
                types = {k: v.get_dtype() for k, v in slices.items()}
        except Exception as e:  # SafetensorError: cut header or data region, not safetensors
            raise ValueError(f"model.source={f.parent}: {f.name} is damaged or not a "
                             f"safetensors file ({e}); re-download it") from None
        odd = next(((k, t) for k, t in types.items() if t not in _FLOAT_TYPES), None)
        if odd:  # an I8 tensor was imported, and exported, as I8
            raise ValueError(f"model.source={f.parent}: {f.name}: {odd[0]} is stored as {odd[1]}, "
                             "not as floats: quantized or damaged weights cannot be pruned; give "
                             "the model's bf16/fp16/fp32 weights")
        return shapes
    if not zipfile.is_zipfile(f):
        with open(f, "rb") as fh:
            head = fh.read(2)
        if head.startswith(b"\x80"):  # an old pickle-only torch.save: the import reads it whole
            return None
        why = "a zip archive cut short" if head == b"PK" else "not a PyTorch weights file"
        raise ValueError(f"model.source={f.parent}: {f.name} is {why}; re-download it, or "
                         "convert the weights to safetensors")
    try:
        return {k: tuple(v.shape) for k, v in load_bin(f, mmap=True).items()
                if isinstance(v, torch.Tensor)}
    except ValueError:
        raise  # names the file and the fix
    except Exception as e:  # a cut zip archive, a record torch cannot read
        raise ValueError(f"model.source={f.parent}: {f.name} does not load as PyTorch weights "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); re-download it, "
                         "or convert the weights to safetensors") from None


def _config_fields(arch: Arch, d: dict) -> dict[str, str]:
    """Arch field -> the config.json field(s) it comes from, with their values."""
    fam = family(arch.model_type)
    ffn = "moe_intermediate_size" if fam.moe and d.get("moe_intermediate_size") else \
        "intermediate_size"
    head_dim = "head_dim" if d.get("head_dim") else "head_dim (hidden_size / num_attention_heads)"
    kv = "num_key_value_heads" if d.get("num_key_value_heads") else \
        "num_key_value_heads (num_attention_heads)"
    experts = "num_local_experts" if d.get("num_local_experts") else "num_experts"
    names = {"hidden_size": "hidden_size", "ffn_hidden_size": ffn,
             "num_attention_heads": "num_attention_heads", "num_query_groups": kv,
             "head_dim": head_dim, "vocab_size": "vocab_size", "num_experts": experts,
             "moe_shared_expert_intermediate_size": "shared_expert_intermediate_size"}
    return {k: f"{v}={getattr(arch, k)}" for k, v in names.items() if getattr(arch, k)}


def _fields_of(arch: Arch, d: dict, names) -> str:
    """The config fields the shapes of canonical tensors ``names`` depend on: those whose
    change changes one of them (canonical_shapes of a copy with the field doubled)."""
    want = canonical_shapes(arch)
    out = []
    for k, label in _config_fields(arch, d).items():
        other = copy.copy(arch)  # no validation: only the shapes are computed
        setattr(other, k, getattr(arch, k) * 2)
        changed = canonical_shapes(other)
        if any(changed.get(n, want[n]) != want[n] for n in names if n in want):
            out.append(label)
    return ", ".join(out) or "the config's sizes"


def _shape(s) -> str:
    return f"({', '.join(map(str, s))}{',' if len(s) == 1 else ''})"


def weights(local: Path, arch: Arch, d: dict) -> None:
    """Every tensor of the weight files the import reads has the name and shape that
    config.json implies (headers only), after the loader's own renaming."""
    fix = "the weights and config.json disagree: give the config.json that came with them, " \
          "or re-download the model"
    index = local / INDEX
    files = weight_files(local)  # the index parses and names no missing shard
    found: dict[str, tuple[tuple[int, ...], Path, str]] = {}  # canonical -> (shape, file, name)
    held: dict[str, set] = {}
    for f in files:
        shapes = _shapes_of(f)
        if shapes is None:
            return  # an old .bin: its names and shapes are checked as it loads
        held[f.name] = set(shapes)
        for k, s in shapes.items():
            try:
                parts = to_canonical({k: torch.empty(s, device="meta")}, arch)
            except (ValueError, IndexError, RuntimeError) as e:
                fused = fused_names(arch).get(k, (k,))
                raise ValueError(f"model.source={local}: {f.name}: {k} has shape {_shape(s)}, "
                                 f"which config.json's {_fields_of(arch, d, fused)} cannot split "
                                 f"({str(e).splitlines()[0]}); {fix}") from None
            found.update({n: (tuple(t.shape), f, k) for n, t in parts.items()})
    if index.is_file():
        for name, shard in read_index(index).items():
            if name not in held.get(shard, set()):
                raise ValueError(f"model.source={index} lists {name} in {shard}, which does not "
                                 "hold it; re-download the model")
    check_names(found, arch, f"model.source={local}")
    for n, want in canonical_shapes(arch).items():
        got, f, k = found[n]
        if got != tuple(want):
            what = n if k == n else f"{n} (split from {k})"
            raise ValueError(f"model.source={local}: {f.name}: {what} has shape {_shape(got)}, "
                             f"but config.json's {_fields_of(arch, d, [n])} give "
                             f"{_shape(want)}; {fix}")


def tokenizer(local: Path, arch: Arch) -> None:
    """The directory's tokenizer loads as the import loads it (the import stores it with the
    checkpoint; without one, it failed after the weights loaded)."""
    if not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"model.source={local} has no tokenizer files (tokenizer.json, "
                         "tokenizer_config.json, tokenizer.model, ...), and the import stores the "
                         "tokenizer with the checkpoint; copy the model's tokenizer files into it "
                         "(model.tokenizer= is only for a megatron checkpoint source)")
    for name in _TOKENIZER_JSON:
        if (local / name).is_file():
            try:
                json.loads((local / name).read_text())
            except (ValueError, OSError) as e:
                raise ValueError(f"model.source={local / name} does not read as JSON ({e}); "
                                 "re-download it") from None
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(local), config=hf_config_from_arch(arch))
    except Exception as e:  # a broken vocabulary file, a class this transformers lacks
        msg = " ".join(str(e).split())[:200]
        raise ValueError(f"model.source={local}: its tokenizer does not load "
                         f"({type(e).__name__}: {msg}); re-download the tokenizer files") from None


def hf_dir(local: Path) -> Arch:
    """The architecture of Hugging Face model directory ``local``, its config, weight files
    and tokenizer checked as above (the import reads them after the weights)."""
    d = config(local)
    try:  # the plain JSON, as the importer reads it (stock config classes reject pruned shapes)
        arch = arch_from_hf_config(d)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"model.source={local}/config.json: {e}") from None
    weights(local, arch, d)
    tokenizer(local, arch)
    return arch

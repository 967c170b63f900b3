"""Import Hugging Face decoder checkpoints into ours, and export them back.

Sources: a local directory (``config.json`` + safetensors/bin), a hub name (downloaded with
``huggingface_hub`` where a hub is reachable), or a GGUF file (dequantised by ``transformers``).
Directories are read as plain JSON and safetensors, not through transformers' model classes, so a
checkpoint whose config stock transformers rejects (a pruned Llama with hidden != heads *
head_dim) imports too; transformers is used for tokenizers and GGUF only.
Export writes a directory that ``AutoModelForCausalLM.from_pretrained`` loads with no extra code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..arch import Arch
from ..artifacts import atomic
from ..dtypes import all_finite, torch_dtype
from . import checkpoint as ckpt
from ..families import export_family, family
from .experts import per_expert
from .fused import fuse, fused_names, unfuse
from .hf_config import arch_from_hf_config, hf_config_from_arch
from .weights import LM_HEAD, canonical_keys

# transformers and huggingface_hub are imported where a Hugging Face model or hub download is
# used: heavy, and reading GGUF or safetensors needs neither.



def resolve_source(source: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(directory or hub name, gguf file name) for a source given as a path, .gguf file or hub id."""
    p = Path(source).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name
    if p.is_dir():
        return str(p), gguf_file
    if p.is_file():
        raise FileNotFoundError(f"model.source={source} is a file but not a .gguf model; give a "
                                "Hugging Face model directory, a .gguf file or a hub name")
    if p.suffix == ".gguf" or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model source {source} does not exist; give a local directory, "
                                "a .gguf file or a Hugging Face hub name")
    return source, gguf_file  # hub name


INDEX = "model.safetensors.index.json"


def read_index(index: Path) -> dict[str, str]:
    """The weight map (tensor name -> shard file name) of a sharded safetensors index."""
    try:
        wmap = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:  # not JSON, not an object, no weight_map
        why = str(e) if isinstance(e, json.JSONDecodeError) else "no weight_map object"
        raise ValueError(f"{index} is not a safetensors index ({why}); re-download it") from None
    if not isinstance(wmap, dict) or not all(isinstance(f, str) for f in wmap.values()):
        raise ValueError(f"{index}: weight_map must map tensor names to shard file names; "
                         "re-download it")
    return wmap


def weight_files(where: Path) -> list[Path]:
    """The weight files of a HF directory that the import reads: the shards its safetensors
    index names (hub repos may also hold consolidated copies), else ``model.safetensors``, else
    every ``*.safetensors``, else the PyTorch ``pytorch_model*.bin`` files."""
    index = where / INDEX
    if index.is_file():
        files = [where / f for f in sorted(set(read_index(index).values()))]
        gone = [f.name for f in files if not f.is_file()]
        if gone:
            raise FileNotFoundError(f"{index} names shard {gone[0]}, which is not in {where} "
                                    f"({len(gone)} of {len(files)} shards missing); re-download "
                                    "the model")
    elif (where / "model.safetensors").is_file():
        files = [where / "model.safetensors"]
    else:
        files = sorted(where.glob("*.safetensors")) or sorted(where.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{where} has no *.safetensors or pytorch_model*.bin weights")
    return files


def load_bin(f: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch ``.bin`` file, loaded weights-only (a pickle may run code);
    ``mmap``: mapped, not read (their shapes cost no read of the data)."""
    import pickle

    try:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # a class outside torch's allowlist: never allowlist it
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:
            raise ValueError(f"{f} is not a weights-only PyTorch file (damaged, or a pickle of "
                             "other objects); re-download it, or convert the weights to "
                             "safetensors") from None
        raise ValueError(f"{f} holds a {found[1]} object, which a weights-only load refuses "
                         "(unpickling it could run code); convert the weights to safetensors "
                         "(save_pretrained with safe_serialization=True where they were "
                         "made)") from None
    except (RuntimeError, EOFError, OSError) as e:  # a cut or foreign file
        raise ValueError(f"{f} does not load as PyTorch weights ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); re-download it, or convert the "
                         "weights to safetensors") from None
    if not isinstance(state, dict):
        raise ValueError(f"{f} holds a {type(state).__name__}, not a state dict of tensors; "
                         "convert the weights to safetensors")
    return state


def _read_tensors(where: Path, dtype: str) -> dict[str, torch.Tensor]:
    """Every tensor of a HF directory: sharded or single safetensors, else PyTorch .bin files."""
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(where):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as sf:
                state.update({k: sf.get_tensor(k) for k in sf.keys()})
        else:
            state.update(load_bin(f))
    if dtype != "auto":
        state = {k: v.to(torch_dtype(dtype)) for k, v in state.items()}
    return state


def _from_gguf(where: str, gguf: str, dtype: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(where, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(
        where, gguf_file=gguf, dtype="auto" if dtype == "auto" else torch_dtype(dtype))
    return cfg.to_dict(), model.state_dict()


def to_canonical(state: dict[str, torch.Tensor], arch: Arch) -> dict[str, torch.Tensor]:
    """A Hugging Face model's tensors under our canonical names: a tied ``lm_head`` and rotary
    buffers dropped, fused experts and Phi-3's fused projections split. Tensor by tensor, so
    it maps shapes alone too (``meta`` tensors, :mod:`.hf_checks`)."""
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")
             and not (arch.tie_embeddings and k == LM_HEAD)}
    state = per_expert(state, arch)  # transformers 5.x's fused experts (GGUF, in-memory)
    if family(arch.model_type).fused:
        state = unfuse(state, arch)  # Phi-3's qkv_proj / gate_up_proj
    return state


def check_names(names, arch: Arch, source) -> None:
    """``names`` (canonical) are exactly the tensors ``arch`` has."""
    want = set(canonical_keys(arch))
    missing, extra = want - set(names), set(names) - want
    if missing or extra:
        raise ValueError(f"unexpected weights in {source}: missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(extra)[:4]}: do config.json's model_type and "
                         "layer and expert counts belong to these weights?")


def load_hf(source: str, *, gguf_file: str | None = None, dtype: str = "auto"):
    """(arch, canonical tensors, tokenizer, special token ids of the config) from a HF source."""
    from transformers import AutoTokenizer

    where, gguf = resolve_source(source, gguf_file)
    if gguf:
        cfg, state = _from_gguf(where, gguf, dtype)
    else:
        if not Path(where).is_dir():  # a hub name: fetch the files we read
            from huggingface_hub import snapshot_download

            where = snapshot_download(where, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                             "*.txt", "tokenizer*"],
                                      ignore_patterns=["consolidated*"])  # Mistral's duplicate copy
        cfg = json.loads((Path(where) / "config.json").read_text())
        state = None
    arch = arch_from_hf_config(cfg)  # refuses unsupported configs before reading any weight
    if state is None:
        state = _read_tensors(Path(where), dtype)
    state = to_canonical(state, arch)
    check_names(state, arch, source)
    bad = next((k for k, v in state.items() if v.is_floating_point() and not all_finite([v])),
               None)
    if bad:  # every later stage would compute NaN from it
        raise ValueError(f"{source}: {bad} holds NaN or infinite values; re-download the model "
                         "(or use the checkpoint it came from)")
    # our config object, not transformers' reading of config.json, which may reject the shape
    kw = {"gguf_file": gguf} if gguf else {"config": hf_config_from_arch(arch)}
    tokenizer = AutoTokenizer.from_pretrained(where, **kw)
    special = {k: cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return arch, {k: v.contiguous() for k, v in state.items()}, tokenizer, special


def import_hf(source: str, output: str, *, gguf_file: str | None = None, dtype: str = "auto",
              overwrite: bool = False) -> Path:
    """Convert a Hugging Face model into a checkpoint directory at ``output``."""
    atomic.check_new_dir(output, overwrite)  # fail before the slow load
    arch, tensors, tokenizer, special = load_hf(source, gguf_file=gguf_file, dtype=dtype)
    prov = {"stage": "import", "source": source, "gguf_file": gguf_file,
            "dtype": str(next(iter(tensors.values())).dtype), "special_tokens": special}
    return ckpt.save(output, arch, tensors, tokenizer=tokenizer, provenance=prov,
                     overwrite=overwrite)


def _special_tokens(meta: dict, tok, vocab_size: int) -> dict:
    """Special token ids for the exported config: the source config's, else the tokenizer's."""
    recorded = meta.get("special_tokens") or {}
    out = {}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = recorded.get(k) if k in recorded else getattr(tok, k, None)
        ok = v is None or (isinstance(v, int) and 0 <= v < vocab_size) or (
            isinstance(v, list) and all(0 <= x < vocab_size for x in v))
        out[k] = v if ok else None
    return out


def _export_shards(weight_map: dict[str, str], arch: Arch, fused: bool) -> dict[str, list[str]]:
    """Output file -> the canonical tensors it gets: the checkpoint's own files, with the parts
    of a fused projection moved into its first part's file when the export joins them."""
    where = dict(weight_map)
    if fused:
        for parts in fused_names(arch).values():
            for p in parts[1:]:
                where[p] = where[parts[0]]
    out: dict[str, list[str]] = {}
    for k, f in sorted(where.items(), key=lambda kv: kv[1]):
        out.setdefault(f, []).append(k)
    return out


def export_hf(checkpoint: str, output: str, *, dtype: str | None = None,
              overwrite: bool = False) -> Path:
    """Write checkpoint ``checkpoint`` as a Hugging Face model directory at ``output``."""
    src = ckpt.Checkpoint(checkpoint)
    arch: Arch = src.arch
    fused = export_family(arch).fused
    with atomic.new_dir(output, overwrite) as tmp:
        shards = _export_shards(src.weight_map, arch, fused)
        tdtype, weight_map, total = None, {}, 0
        for f, names in shards.items():
            tensors = {k: src.get(k) for k in names}
            if dtype:
                tensors = {k: t.to(torch_dtype(dtype)) for k, t in tensors.items()}
            if fused:
                tensors = fuse(tensors, arch)
            tdtype = tdtype or next(iter(tensors.values())).dtype
            save_file(tensors, str(tmp / f), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, f))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        if len(shards) == 1:
            (tmp / f).rename(tmp / "model.safetensors")
        else:
            atomic.write_json(tmp / ckpt.INDEX, {"metadata": {"total_size": total},
                                                 "weight_map": dict(sorted(weight_map.items()))})
        tok = src.tokenizer(required=False)
        if tok is not None:
            tok.save_pretrained(str(tmp))
        cfg = hf_config_from_arch(arch, torch_dtype=str(tdtype).replace("torch.", ""),
                                  **_special_tokens(src.meta, tok, arch.vocab_size))
        cfg.save_pretrained(str(tmp))
        atomic.write_json(tmp / "minitron_provenance.json",
                          {"exported_from": str(src.path), **src.meta}, default=str)
    return Path(output)

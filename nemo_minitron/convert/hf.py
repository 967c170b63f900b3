"""Import Hugging Face Llama-family models into our checkpoints, and export them back.

Sources: a local directory (``config.json`` + safetensors/bin), a hub name (downloaded with
``huggingface_hub`` where a hub is reachable), or a GGUF file (dequantised by ``transformers``).
Export writes a directory that ``AutoModelForCausalLM.from_pretrained`` loads with no extra code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..arch import Arch
from . import checkpoint as ckpt
from .hf_config import arch_from_hf_config, export_model_type, hf_config_from_arch
from .weights import LM_HEAD, canonical_keys

_STR_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_source(source: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(directory or hub name, gguf file name) for a source given as a path, .gguf file or hub id."""
    p = Path(source).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name
    if p.is_dir():
        return str(p), gguf_file
    if p.suffix == ".gguf" or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model source {source} does not exist; give a local directory, "
                                "a .gguf file or a Hugging Face hub name")
    return source, gguf_file  # hub name


def load_hf(source: str, *, gguf_file: str | None = None, dtype: str = "auto"):
    """(arch, canonical tensors, tokenizer, special token ids of the config) from a HF source."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve_source(source, gguf_file)
    kw = {"gguf_file": gguf} if gguf else {}
    cfg = AutoConfig.from_pretrained(where, **kw)
    arch = arch_from_hf_config(cfg)
    model = AutoModelForCausalLM.from_pretrained(where, dtype="auto" if dtype == "auto" else
                                                 _STR_DTYPES[dtype], **kw)
    state = model.state_dict()
    if dtype != "auto":
        state = {k: v.to(_STR_DTYPES[dtype]) for k, v in state.items()}
    if arch.tie_embeddings:
        state.pop(LM_HEAD, None)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    want = set(canonical_keys(arch))
    missing, extra = want - set(state), set(state) - want
    if missing or extra:
        raise ValueError(f"unexpected weights in {source}: missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(extra)[:4]}")
    tokenizer = AutoTokenizer.from_pretrained(where, **kw)
    special = {k: getattr(cfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return arch, {k: v.contiguous() for k, v in state.items()}, tokenizer, special


def import_hf(source: str, output: str, *, gguf_file: str | None = None, dtype: str = "auto",
              overwrite: bool = False) -> Path:
    """Convert a Hugging Face model into a checkpoint directory at ``output``."""
    ckpt.prepare_output(output, overwrite)  # fail before the slow load
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


def export_hf(checkpoint: str, output: str, *, dtype: str | None = None,
              overwrite: bool = False) -> Path:
    """Write checkpoint ``checkpoint`` as a Hugging Face model directory at ``output``."""
    from safetensors.torch import save_file

    src = ckpt.Checkpoint(checkpoint)
    arch: Arch = src.arch
    final, tmp = ckpt.prepare_output(output, overwrite)
    tmp.mkdir(parents=True)
    try:
        shards = sorted(set(src.weight_map.values()))
        tdtype = None
        for f in shards:
            tensors = {k: src.get(k) for k, v in src.weight_map.items() if v == f}
            if dtype:
                tensors = {k: t.to(_STR_DTYPES[dtype]) for k, t in tensors.items()}
            tdtype = tdtype or next(iter(tensors.values())).dtype
            save_file(tensors, str(tmp / f), metadata={"format": "pt"})
        if len(shards) == 1:
            (tmp / shards[0]).rename(tmp / "model.safetensors")
        else:
            shutil.copy(src.path / ckpt.INDEX, tmp / ckpt.INDEX)
        tok = src.tokenizer() if (src.path / ckpt.TOKENIZER).is_dir() else None
        if tok is not None:
            tok.save_pretrained(str(tmp))
        cfg = hf_config_from_arch(arch, torch_dtype=str(tdtype).replace("torch.", ""),
                                  **_special_tokens(src.meta, tok, arch.vocab_size))
        cfg.architectures = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                              "qwen2": "Qwen2ForCausalLM"}[export_model_type(arch)]]
        cfg.save_pretrained(str(tmp))
        (tmp / "minitron_provenance.json").write_text(json.dumps(
            {"exported_from": str(src.path), **src.meta}, indent=2, default=str))
        ckpt.commit_output(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final

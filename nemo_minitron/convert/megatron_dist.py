"""megatron-core distributed checkpoints (``torch_dist``, what Megatron-LM and Megatron-Bridge
write) into our checkpoints; the layout our models go out in, which
:mod:`nemo_minitron.runtime.megatron_save` writes from a built model.

Layouts read: a directory with megatron-core's ``metadata.json`` (plain ``dist_checkpointing.save``)
or Megatron-LM's ``latest_checkpointed_iteration.txt`` + ``iter_NNNNNNN/`` (or ``release/``).
Tensors are stored under global, layout-free names (layers stacked along a leading dimension,
Q/K/V interleaved per query group over all groups, ``linear_fc1`` as ``[gate; up]``), which is
megatron's state dict at TP=1: :func:`..weights.from_megatron` with one shard maps them to ours.
So a checkpoint written at any TP/PP imports, and ours export at any TP/PP (megatron-core's own
``dist_checkpointing.save`` from the model built at the job's layout), and either reshards on load.

Export writes Megatron-LM's layout (``release/`` + tracker, ``model`` sub-dict,
``checkpoint_version``) so Megatron-LM continues training from it with ``--load <dir> --finetune
--no-load-optim --no-load-rng``; plain megatron-core loads it with
``dist_checkpointing.load({"model": model.sharded_state_dict()}, "<dir>/release")``. The
architecture goes into ``common.pt`` as ``minitron_arch``, a plain dict: an ``args`` Namespace
would make megatron-core's own ``torch.load(weights_only=True)`` of ``common.pt`` refuse the file,
and Megatron-LM only needs ``args`` to check a resumed run's command line.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from argparse import Namespace
from pathlib import Path

import torch

from ..arch import Arch
from ..artifacts import atomic
from ..dtypes import torch_dtype
from . import checkpoint as ckpt
from .dcp_reader import DcpReader
from .megatron_args import arch_fields_from_args, check_shapes, infer_from_shapes
from .weights import from_megatron

# megatron-core and transformers are imported where used (see _args_types): importing a Hugging
# Face model or reading the layout must not pay for them.

log = logging.getLogger(__name__)

MCORE_META, COMMON = "metadata.json", "common.pt"
TRACKER, RELEASE = "latest_checkpointed_iteration.txt", "release"
EMBED_KEY = "embedding.word_embeddings.weight"
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def is_megatron_checkpoint(path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / MCORE_META).is_file() or (p / TRACKER).is_file())


def find_checkpoint(path) -> Path:
    """The directory holding ``metadata.json``: ``path`` itself, or the iteration its Megatron-LM
    tracker file names."""
    p = Path(path)
    if (p / TRACKER).is_file() and not (p / MCORE_META).is_file():
        it = (p / TRACKER).read_text().strip()
        p = p / (RELEASE if it == RELEASE else f"iter_{int(it):07d}")
        if (p / "mp_rank_00").is_dir():
            raise ValueError(f"{p} is in Megatron-LM's legacy per-rank 'torch' format; convert it to "
                             "torch_dist first (Megatron-LM: --ckpt-convert-format torch_dist)")
    if not (p / MCORE_META).is_file():
        raise ValueError(f"{p} has no {MCORE_META}: not a megatron-core distributed checkpoint "
                         "(give the directory Megatron-LM's --save wrote, or one dist_checkpointing"
                         ".save wrote)")
    meta = json.loads((p / MCORE_META).read_text())
    if meta.get("sharded_backend") != "torch_dist":
        raise ValueError(f"{p}/{MCORE_META}: sharded_backend={meta.get('sharded_backend')!r}; only "
                         "'torch_dist' is read (re-save with Megatron-LM --ckpt-format torch_dist)")
    return p


def _args_types() -> list:
    """What Megatron-LM's ``args`` are made of beyond tensors and containers: the Namespace and
    megatron-core enums (building either runs no code). Imported here, not at the top, so that
    importing a Hugging Face model does not pay for megatron-core."""
    from megatron.core.enums import ModelType
    from megatron.core.rerun_state_machine import RerunDiagnostic, RerunMode, RerunState
    from megatron.core.transformer.enums import AttnBackend, AttnMaskType

    return [Namespace, ModelType, AttnBackend, AttnMaskType, RerunDiagnostic, RerunMode, RerunState]


def read_common(path: Path) -> tuple[dict, str]:
    """(common state, why it is empty): ``common.pt`` read with ``weights_only=True``, allowing
    only the types of Megatron-LM's ``args`` (:func:`_args_types`) beyond that."""
    f = path / COMMON
    if not f.is_file():
        return {}, f"{f} is missing"
    try:
        with torch.serialization.safe_globals(_args_types()):
            common = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        return {}, f"{f} holds objects torch.load(weights_only=True) refuses ({str(e).split(chr(10))[0][:160]})"
    return (common if isinstance(common, dict) else {}), "it records no architecture"


class GlobalTensors:
    """The checkpoint's model tensors under megatron's names at TP=1 (``decoder.layers.{i}.…``),
    whichever way layers were stored: stacked (``decoder.layers.X`` with a leading layer
    dimension, megatron's default) or one key per layer (``decoder.layers.{i}.X``)."""

    def __init__(self, reader: DcpReader):
        self.reader = reader
        keys = reader.tensor_keys()
        embed = [k for k in keys if k.endswith(EMBED_KEY)]
        if not embed:
            raise ValueError(f"{reader.dir} has no {EMBED_KEY}: not a GPTModel checkpoint")
        # The shortest match is the model's own (optimizer states repeat it after a prefix);
        # a writer may nest the model under one too ("model.").
        self.prefix = min(embed, key=len)[: -len(EMBED_KEY)]
        self.keys = {k[len(self.prefix):] for k in keys if k.startswith(self.prefix)}

    def shapes(self) -> dict[str, tuple]:
        """Global shapes, with per-layer keys folded into stacked ones."""
        out, layers = {}, {}
        for k in self.keys:
            shape = self.reader.shape(self.prefix + k)
            m = _LAYER.fullmatch(k)
            if m:
                layers.setdefault(m[2], []).append(shape)
            else:
                out[k] = shape
        for rest, shapes in layers.items():
            out["decoder.layers." + rest] = (len(shapes),) + tuple(shapes[0])
        return out

    def __getitem__(self, name: str) -> torch.Tensor:
        m = _LAYER.fullmatch(name)
        if m and name in self.keys:
            return self.reader.read(self.prefix + name)
        if m:
            i = int(m[1])
            return self.reader.read(self.prefix + "decoder.layers." + m[2], (slice(i, i + 1),))[0]
        return self.reader.read(self.prefix + name)


def resolve_arch(shapes: dict, common: dict, why: str, overrides: dict, where) -> tuple[Arch, str]:
    """(Arch, where it came from): shapes, then the checkpoint's record, then ``overrides``."""
    fields, source = infer_from_shapes(shapes), "tensor shapes"
    if isinstance(common.get("minitron_arch"), dict):
        fields.update(common["minitron_arch"])
        source = "the checkpoint's minitron_arch"
    elif isinstance(common.get("args"), Namespace):
        fields.update(arch_fields_from_args(common["args"]))
        source = "the checkpoint's Megatron-LM args"
    fields.update(overrides or {})
    missing = [k for k in ("num_attention_heads", "num_query_groups") if k not in fields]
    if missing:
        raise ValueError(f"{where}: the architecture cannot be read ({why}); give it: "
                         + " ".join(f"+model.arch.{k}=..." for k in missing)
                         + " (and rope_theta, norm_eps, max_position_embeddings where they differ "
                         "from the defaults)")
    fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    arch = Arch.from_dict(fields)
    check_shapes(arch, shapes, where)
    return arch, source + (" + model.arch" if overrides else "")


def load_megatron(source, arch_overrides: dict | None = None) -> tuple[Arch, dict, dict]:
    """(arch, canonical tensors, provenance) of a megatron-core distributed checkpoint."""
    path = find_checkpoint(source)
    g = GlobalTensors(DcpReader(path))
    shapes = g.shapes()
    for k in ("decoder.layers.mlp.linear_fc2.weight", "decoder.layers.self_attention.linear_qkv.weight"):
        if k not in shapes:
            raise ValueError(f"{path} has no {k}: only dense Llama-family GPT models import")
    common, why = read_common(path)
    arch, arch_from = resolve_arch(shapes, common, why, dict(arch_overrides or {}), path)
    if "vocab_size" not in (arch_overrides or {}) and not (common.get("minitron_arch") or getattr(
            common.get("args"), "vocab_size", None)):
        log.warning("%s: vocabulary size not recorded; keeping all %d embedding rows (set "
                    "+model.arch.vocab_size to the tokenizer's to drop padding)", path, arch.vocab_size)
    te = "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in shapes
    tensors = from_megatron([g], arch, layers=range(arch.num_layers), pre_process=True,
                            post_process=True, te=te)
    prov = {"stage": "import", "source": str(source), "source_format": "megatron torch_dist",
            "arch_from": arch_from, "iteration": common.get("iteration")}
    return arch, tensors, prov


def import_megatron(source: str, output: str, *, arch_overrides: dict | None = None,
                    tokenizer: str | None = None, dtype: str = "auto",
                    overwrite: bool = False) -> Path:
    """Convert a megatron-core distributed checkpoint into a checkpoint directory at ``output``."""
    atomic.check_new_dir(output, overwrite)  # fail before reading
    arch, tensors, prov = load_megatron(source, arch_overrides)
    if dtype != "auto":
        tensors = {k: v.to(torch_dtype(dtype)) for k, v in tensors.items()}
    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    prov["dtype"] = str(next(iter(tensors.values())).dtype)
    return ckpt.save(output, arch, tensors, tokenizer=tok, provenance=prov, overwrite=overwrite)

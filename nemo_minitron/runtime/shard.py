"""This rank's shard of a model (its pipeline stage's layers, its tensor- and expert-parallel
slices): build it, fill it from a checkpoint, save it back.

A :class:`ModelShard` is the narrow interface the rest of the package uses: the megatron-core
module, the :class:`Arch` it was built from and which global layers it holds. Loading reads only
this pipeline stage's tensors from the checkpoint and slices this rank's tensor-parallel part;
saving gathers TP parts, and every pipeline stage writes its own safetensors file (data-parallel
rank 0 only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..arch import Arch
from ..artifacts import atomic
from ..convert import checkpoint as ckpt
from ..convert.weights import EMBED, from_megatron, to_megatron
from . import dist
from .collectives import all_gather, all_gather_objects
from . import model as rmodel
from . import sharded_save

# megatron-core is imported inside the functions that use it: importing it takes seconds, and this
# module is imported (by the stages, preflight, the tests) long before a model is built.


@dataclass
class ModelShard:
    model: torch.nn.Module
    arch: Arch
    config: object
    layers: range
    pre_process: bool
    post_process: bool
    te: bool

    @property
    def tp_size(self) -> int:
        return self.config.tensor_model_parallel_size


def build_shard(arch: Arch, dtype: str = "fp32", use_te: bool | None = None,
                init_weights: bool = True, fp8: str | None = None,
                aux_loss_coeff: float = 0.0) -> ModelShard:
    """``fp8``: TransformerConfig's FP8 format ("hybrid", "e4m3"); megatron-core applies it only
    through Transformer Engine modules, so it needs the TE spec. ``aux_loss_coeff``: weight of
    the MoE routers' load-balancing loss while the model trains (0: none)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    # a dense model (a teacher or student next to an MoE one) runs replicated over the EP ranks
    ep = ps.get_expert_model_parallel_world_size() if arch.is_moe else 1
    arch.check_parallel(tp, pp, ep)
    te = rmodel.te_available() if use_te is None else use_te
    if fp8 and not te:
        raise ValueError(f"fp8={fp8!r} needs the Transformer Engine layer spec (megatron-core "
                         "ignores fp8 with the local spec); install transformer_engine on a GPU "
                         "host or drop fp8")
    config = rmodel.transformer_config(arch, tp, pp, dtype, fp8=fp8, init_weights=init_weights,
                                       ep=ep, aux_loss_coeff=aux_loss_coeff)
    pre, post = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    model = rmodel.build_gpt(arch, config, pre, post, use_te=te)
    offset = get_transformer_layer_offset(config)
    layers = range(offset, offset + arch.num_layers // pp)
    return ModelShard(model, arch, config, layers, pre, post, te)


def load_state(shard: ModelShard, get, get_part=None) -> None:
    """Fill ``shard`` from canonical tensors fetched by ``get(name)`` (TP shards by
    ``get_part(name, dim, rank, parts)`` when given: a checkpoint's sliced reads)."""
    from megatron.core import parallel_state as ps

    sd = to_megatron(get, shard.arch, tp_rank=ps.get_tensor_model_parallel_rank(),
                     tp_size=shard.tp_size, layers=shard.layers, pre_process=shard.pre_process,
                     post_process=shard.post_process, te=shard.te, get_part=get_part,
                     ep_rank=ps.get_expert_model_parallel_rank(),
                     ep_size=ps.get_expert_model_parallel_world_size())
    own = shard.model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("_extra_state")]
    if missing:
        raise RuntimeError(f"weight map left model tensors unset: {missing[:5]}")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise RuntimeError(f"shape mismatch for {k}: model {tuple(own[k].shape)}, "
                               f"checkpoint {tuple(v.shape)}")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)


def load_checkpoint(path, dtype: str = "fp32", use_te: bool | None = None,
                    aux_loss_coeff: float = 0.0) -> tuple[ModelShard, ckpt.Checkpoint]:
    c = ckpt.Checkpoint(path).verify()  # a damaged checkpoint fails here, before building
    shard = build_shard(c.arch, dtype, use_te, init_weights=False, aux_loss_coeff=aux_loss_coeff)
    load_state(shard, c.get, c.get_part)  # each TP rank reads only its slices
    return shard, c


def gather_canonical(shard: ModelShard) -> dict[str, torch.Tensor] | None:
    """Canonical tensors of this shard on TP rank 0 (None elsewhere); all TP ranks must call."""
    from megatron.core import parallel_state as ps

    sd = _gather_experts(sharded_save.local_state(shard))
    tp = shard.tp_size
    if tp == 1:
        shards = [sd]
    else:
        group = ps.get_tensor_model_parallel_group()
        shards = [dict() for _ in range(tp)]
        for k in sorted(sd):
            parts = all_gather(sd[k], group)
            for r in range(tp):
                shards[r][k] = parts[r]
    if ps.get_tensor_model_parallel_rank() != 0:
        return None
    return from_megatron(shards, shard.arch, layers=shard.layers, pre_process=shard.pre_process,
                         post_process=shard.post_process, te=shard.te)


_LOCAL_EXPERT = re.compile(r"(.*\.local_experts\.)(\d+)(\..*)")


def _gather_experts(sd: dict) -> dict:
    """``sd`` with every expert of the model, numbered globally: under expert parallelism each
    rank holds ``E/ep`` experts as local ``0..E/ep-1``; all ranks of the EP group must call."""
    from megatron.core import parallel_state as ps

    ep = ps.get_expert_model_parallel_world_size()
    local = {k: v for k, v in sd.items() if _LOCAL_EXPERT.match(k)}
    if ep == 1 or not local:  # a dense model is built whole on every EP rank
        return sd
    group = ps.get_expert_model_parallel_group()
    per_rank = 1 + max(int(_LOCAL_EXPERT.match(k).group(2)) for k in local)
    out = {k: v for k, v in sd.items() if k not in local}
    for k in sorted(local):
        parts = all_gather(local[k], group)
        head, i, tail = _LOCAL_EXPERT.match(k).groups()
        for r, t in enumerate(parts):
            out[f"{head}{r * per_rank + int(i)}{tail}"] = t
    return out


def _write_gathered(shard: ModelShard, tmp: Path, transform) -> dict[str, str]:
    """The canonical layout: this stage's whole tensors, gathered over TP, written by TP and
    DP rank 0 to the stage's file; returns its weight map ({} on other ranks)."""
    from megatron.core import parallel_state as ps

    canonical = gather_canonical(shard)
    if canonical is not None and transform is not None:
        canonical = transform(canonical)
    if canonical is not None and not shard.pre_process:
        canonical.pop(EMBED, None)  # a tied embedding is stored once, by the first shard
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    if canonical is None or ps.get_data_parallel_rank() != 0:
        return {}
    return ckpt.write_shard(tmp, ckpt.shard_name(pp_rank, pp), canonical)


def save_checkpoint(shard: ModelShard, path, *, tokenizer=None, provenance: dict | None = None,
                    overwrite: bool = False, arch: Arch | None = None,
                    transform: Callable[[dict], dict] | None = None,
                    extra_files: dict[str, Callable[[Path], None]] | None = None,
                    per_rank: Callable[[Path], None] | None = None, sharded: bool = False) -> Path:
    """Collective save: every rank calls; each pipeline stage writes one shard file.

    ``transform`` maps this shard's canonical tensors to what is written (pruning passes the
    plan's slicing here, with ``arch`` the resulting architecture). ``extra_files``: name ->
    writer(path), called on rank 0 inside the temporary directory before it is committed.
    ``per_rank(tmp_dir)``: called on every rank before the commit (training state files).
    ``sharded``: each TP/EP rank writes its own slices, nothing gathered (periodic training
    checkpoints; where :func:`.sharded_save.applies`, else the canonical layout is written).
    """
    sharded = sharded and sharded_save.applies(shard, transform)
    rank0 = dist.is_rank0()
    err = None
    if rank0:
        try:
            final, tmp = atomic.begin_dir(path, overwrite)
        except (FileExistsError, OSError) as e:
            err, final, tmp = str(e), None, None
    final, tmp, err = dist.broadcast_from_rank0((final, tmp, err) if rank0 else None)
    if err:
        raise FileExistsError(err)
    try:
        wmap = sharded_save.write_local(shard, tmp) if sharded else \
            _write_gathered(shard, tmp, transform)
        if per_rank is not None:
            per_rank(tmp)
        maps = all_gather_objects(wmap)
        if rank0:
            ckpt.save_tokenizer(tmp, tokenizer)
            if sharded:
                sharded_save.write_index(tmp, arch or shard.arch, maps, provenance or {})
            else:
                merged = {k: v for m in maps for k, v in m.items()}
                ckpt.write_meta(tmp, arch or shard.arch, merged, provenance or {})
            for name, writer in (extra_files or {}).items():
                writer(tmp / name)
            atomic.commit_dir(tmp, final)
    finally:
        dist.end_collective_write(tmp, rank0)
    return final

"""The rank-local half of a sharded save (format: :mod:`..convert.sharded`).

:func:`~.stage.save_checkpoint` with ``sharded=True`` calls :func:`write_local` on every rank in
place of the gather: data-parallel rank 0 of each (tp, pp) rank turns its own megatron-core state
dict into canonical-named slices and writes them to its own file, with no collective on weights
(only the small index entries travel, as Python objects, to rank 0, which writes the index).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..arch import Arch
from ..convert import checkpoint as ckpt
from ..convert import sharded
from ..convert.weights import EMBED, canonical_shapes, from_megatron
from .parallel import current


def applies(transform) -> bool:
    """Whether a save at the current layout is written sharded: only at TP > 1 (at TP = 1 nothing
    is gathered anyway), without expert parallelism (experts keep the gather path) and without a
    ``transform`` (pruning rewrites whole tensors)."""
    par = current()
    return par.tp > 1 and par.ep == 1 and transform is None


def local_state(stage) -> dict[str, torch.Tensor]:
    """This rank's model tensors (no Transformer Engine extra state)."""
    return {k: v.detach() for k, v in stage.model.state_dict().items()
            if not k.endswith("_extra_state") and v is not None}


def write_local(stage, tmp: Path) -> dict[str, dict]:
    """Write this rank's slices to ``tmp`` (data-parallel rank 0 only; DP replicas hold the same
    weights); returns their index entries ({} on other ranks)."""
    par = current()
    if par.dp_rank != 0:
        return {}
    local = from_megatron([local_state(stage)], stage.arch, layers=stage.layers,
                          pre_process=stage.pre_process, post_process=stage.post_process,
                          te=stage.te, tp_size=par.tp)
    if not stage.pre_process:
        local.pop(EMBED, None)  # a tied embedding is stored once, by the first stage
    found = sharded.pieces(local, canonical_shapes(stage.arch), par.tp_rank)
    return sharded.write_pieces(tmp, sharded.piece_file(par.tp_rank, par.pp_rank), found)


def write_index(tmp: Path, arch: Arch, entries: list[dict[str, dict]], provenance: dict) -> None:
    """Rank 0, after every rank's :func:`write_local`: arch.json, minitron.json and the index."""
    shapes = canonical_shapes(arch)
    tensors = sharded.merge(entries, shapes)
    if set(tensors) != set(shapes):
        raise ckpt.CheckpointError(f"sharded save lacks {sorted(set(shapes) - set(tensors))[:3]}")
    par = current()
    ckpt.write_description(tmp, arch, provenance)
    sharded.write_index(tmp, tensors, {"tp": par.tp, "pp": par.pp})

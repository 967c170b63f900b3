"""The rank-local half of a sharded save (format: :mod:`..convert.sharded`).

:func:`~.stage.save_checkpoint` with ``sharded=True`` calls :func:`write_local` on every rank in
place of the gather: data-parallel rank 0 of each (tp, pp) rank turns its own megatron-core state
dict into canonical-named slices and writes them to its own file, with no collective on weights
(only the small index entries travel, as Python objects, to rank 0, which writes the index).
Under expert parallelism each EP rank's first replica also writes the experts it holds, so no
expert is gathered either.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..arch import Arch
from ..convert import checkpoint as ckpt
from ..convert import sharded
from ..convert.weights import canonical_shapes
from .parallel import current


def applies(stage, transform) -> bool:
    """Whether a save of ``stage`` at the current layout is written sharded: at TP > 1 or with
    its experts split over EP ranks (otherwise nothing is gathered anyway), and without a
    ``transform`` (pruning rewrites whole tensors)."""
    return transform is None and (current().tp > 1 or expert_layout(stage)[1] > 1)


def expert_layout(stage) -> tuple[int, int]:
    """(EP rank, EP size) the shard's experts are split by; (0, 1) for a dense model, which is
    built whole on every EP rank."""
    ep = getattr(stage.config, "expert_model_parallel_size", 1) or 1
    if ep == 1 or not stage.arch.is_moe:
        return 0, 1
    return current().ep_rank, ep


def writes(stage) -> tuple[bool, bool]:
    """(dense, experts): whether this rank writes its dense tensors (data-parallel rank 0: DP
    replicas hold the same weights) and its experts (under EP, the first replica of its EP
    rank's experts, expert-data-parallel rank 0)."""
    dense = current().dp_rank == 0
    if expert_layout(stage)[1] == 1:
        return dense, dense
    return dense, current().expert_dp_rank == 0


def local_state(stage) -> dict[str, torch.Tensor]:
    """This rank's model tensors (no Transformer Engine extra state)."""
    return {k: v.detach() for k, v in stage.model.state_dict().items()
            if not k.endswith("_extra_state") and v is not None}


def write_local(stage, tmp: Path) -> dict[str, dict]:
    """Write this rank's slices to ``tmp`` (see :func:`writes`); returns their index entries
    ({} on ranks that write nothing)."""
    par = current()
    dense, experts = writes(stage)
    if not (dense or experts):
        return {}
    ep_rank, ep = expert_layout(stage)
    local = sharded.rank_tensors(local_state(stage), stage.arch, layers=stage.layers,
                                 pre_process=stage.pre_process, post_process=stage.post_process,
                                 te=stage.te, tp_size=par.tp, ep_rank=ep_rank, ep=ep,
                                 dense=dense, experts=experts)
    found = sharded.pieces(local, canonical_shapes(stage.arch), par.tp_rank)
    return sharded.write_pieces(tmp, sharded.piece_file(par.tp_rank, par.pp_rank, ep_rank, ep),
                                found)


def write_index(tmp: Path, arch: Arch, entries: list[dict[str, dict]], provenance: dict) -> None:
    """Rank 0, after every rank's :func:`write_local`: arch.json, minitron.json and the index."""
    shapes = canonical_shapes(arch)
    tensors = sharded.merge(entries, shapes)
    if set(tensors) != set(shapes):
        raise ckpt.CheckpointError(f"sharded save lacks {sorted(set(shapes) - set(tensors))[:3]}")
    par = current()
    ep = par.ep if arch.is_moe else 1  # a dense model is not split over EP ranks
    ckpt.write_description(tmp, arch, provenance)
    layout = {"tp": par.tp, "pp": par.pp, **({"ep": ep} if ep > 1 else {})}
    sharded.write_index(tmp, tensors, layout)

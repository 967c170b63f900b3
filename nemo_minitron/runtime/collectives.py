"""Every ``torch.distributed`` collective the package calls, as small functions.

Code outside ``runtime/`` reduces, gathers and waits through these, so the collectives (and what
each does in a single process) are found in one place. ``group=None`` means the whole world;
every function is the identity (or a no-op) without torch.distributed or in a group of one rank.
"""

from __future__ import annotations

import shutil

import torch
import torch.distributed as tdist


def _active(group=None) -> bool:
    return tdist.is_initialized() and tdist.get_world_size(group) > 1


def size_rank(group) -> tuple[int, int]:
    """(size, this rank's index) of ``group``; (1, 0) for None or without torch.distributed:
    for kernels whose group is optional (no group: nothing to combine)."""
    if group is None or not tdist.is_available() or not tdist.is_initialized():
        return 1, 0
    return tdist.get_world_size(group), tdist.get_rank(group)


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` in place over ``group``; returns it."""
    if _active(group):
        tdist.all_reduce(tensor, group=group)
    return tensor


def all_reduce_max(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` in place over ``group``; returns it."""
    if _active(group):
        tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX, group=group)
    return tensor


def reduce_sum_to_first(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum ``tensor`` in place onto the first rank of ``group`` (the others' copies are left
    undefined, as torch's reduce leaves them); returns it."""
    if _active(group):
        tdist.reduce(tensor, dst=tdist.get_global_rank(group, 0), group=group)
    return tensor


def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all), in rank order of ``group``."""
    if not _active(group):
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(tdist.get_world_size(group))]
    tdist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def all_gather_cat(tensor: torch.Tensor, group=None, dim: int = 0) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along ``dim`` in rank order (``tensor`` itself alone)."""
    if not _active(group):
        return tensor
    return torch.cat(all_gather(tensor, group), dim=dim)


def all_gather_objects(obj) -> list:
    """Every rank's picklable ``obj``, in global rank order (``[obj]`` in a single process)."""
    if not tdist.is_initialized():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_from_rank0(obj):
    """Rank 0's ``obj`` on every rank (itself without torch.distributed)."""
    if not tdist.is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op in a single process): e.g. after rank 0 wrote a shared file."""
    if _active():
        tdist.barrier()


def end_collective_write(tmp, rank0: bool) -> None:
    """After every rank wrote into ``tmp`` (and rank 0 committed it or failed): wait for all,
    then rank 0 removes whatever temporary directory is left."""
    if tdist.is_initialized():
        tdist.barrier()
    if rank0 and tmp.exists():
        shutil.rmtree(tmp)

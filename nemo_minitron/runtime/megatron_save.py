"""Our models out as megatron-core distributed checkpoints (``torch_dist``), in Megatron-LM's
layout: the model built at the job's TP/PP layout and saved by ``dist_checkpointing.save``.

The reading half, and the layout this writes, are :mod:`nemo_minitron.convert.megatron_dist`;
saving needs a built model and the process groups, so it lives here, above the converters.
megatron-core's ``dist_checkpointing`` is imported where it is used, so that importing this module
(the CLI's ``export`` does) costs nothing until an export runs.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import atomic
from ..convert import checkpoint as ckpt
from ..convert.megatron_dist import RELEASE, TRACKER
from . import dist
from .shard import ModelShard, load_checkpoint


def save_megatron(shard: ModelShard, output, *, overwrite: bool = False) -> Path:
    """Collective: every rank of the job that built ``shard`` writes its shards with megatron-core's
    ``dist_checkpointing.save``, into a temporary directory renamed when complete."""
    from megatron.core import dist_checkpointing

    rank0 = dist.is_rank0()
    final = tmp = err = None
    if rank0:
        try:
            final, tmp = atomic.begin_dir(output, overwrite)
            (tmp / RELEASE).mkdir()
        except (FileExistsError, OSError) as e:
            err = str(e)
    final, tmp, err = dist.broadcast_from_rank0((final, tmp, err))
    if err:
        raise FileExistsError(err)
    state = {"model": shard.model.sharded_state_dict(), "checkpoint_version": 3.0, "iteration": 0,
             "minitron_arch": shard.arch.to_dict()}
    try:
        dist_checkpointing.save(state, str(tmp / RELEASE))
        if rank0:
            (tmp / TRACKER).write_text(RELEASE)
            atomic.commit_dir(tmp, final)
    finally:
        dist.end_collective_write(tmp, rank0)
    return final


def export_megatron(checkpoint, output, *, dtype: str | None = None, tp: int = 1, pp: int = 1,
                    overwrite: bool = False) -> Path:
    """Collective: our checkpoint built at ``tp`` x ``pp`` and saved by megatron-core."""
    if dist.is_rank0():
        atomic.check_new_dir(output, overwrite)  # fail before building the model
    src = ckpt.Checkpoint(checkpoint)
    if dtype is None:  # keep the stored precision (a bf16 student stays bf16); header only
        stored = src.stored_dtype(next(iter(src.keys())))
        dtype = {"BF16": "bf16", "F16": "fp16"}.get(stored, "fp32")
    dist.init(tp, pp)
    try:
        shard, _ = load_checkpoint(checkpoint, dtype)
        return save_megatron(shard, output, overwrite=overwrite)
    finally:
        dist.release()

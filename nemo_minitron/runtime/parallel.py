"""One value that says how this process sits in the job: the ``Parallel`` context.

:func:`runtime.dist.init` builds it once the process groups exist and returns it; code above
``runtime/`` takes what it needs from it (sizes, ranks, groups, first/last pipeline stage,
``is_rank0``, a rank-0 progress bar, the device) instead of asking megatron-core's
``parallel_state`` or ``torch.cuda`` itself. :func:`current` rebuilds it from the live groups for
code that is handed a model but not the context (an evaluation helper called from a trainer).

Without torch.distributed (plain unit tests of pure pieces) every size is 1, every rank 0 and
every group ``None``: collectives are then skipped by their callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from tqdm import tqdm

# megatron-core is imported inside the functions that use it: importing it takes seconds, and this
# module is imported (by the stages, preflight, the tests) long before a model is built.


@dataclass(frozen=True)
class Parallel:
    """Sizes and this process's ranks (tensor, pipeline, data, expert parallel), its device and
    the process groups collectives run over (``None`` in a single process)."""

    tp: int = 1; pp: int = 1; dp: int = 1; ep: int = 1  # noqa: E702 - the layout, one line
    rank: int = 0; world_size: int = 1  # noqa: E702
    tp_rank: int = 0; pp_rank: int = 0; dp_rank: int = 0  # noqa: E702
    ep_rank: int = 0; expert_dp_rank: int = 0  # noqa: E702 - experts: split, replicated
    device: str = "cpu"
    tp_group: Any = None; pp_group: Any = None; dp_group: Any = None  # noqa: E702
    expert_dp_group: Any = None; ep_group: Any = None  # noqa: E702
    expert_tp_group: Any = None  # the ranks that split each expert's width (megatron: = tp)

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def layout(self) -> dict:
        """The sizes as reports record them (ep when experts are split)."""
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, **({"ep": self.ep} if self.ep > 1 else {})}

    @property
    def torch_device(self) -> torch.device | None:
        """Where tensors of this rank's model live; None on the CPU (torch's default)."""
        if self.device != "cuda":
            return None
        return torch.device("cuda", torch.cuda.current_device())

    def progress(self, iterable: Iterable | None = None, **kw):
        """A tqdm bar shown on rank 0 only (every rank still iterates)."""
        kw["disable"] = kw.get("disable", False) or not self.is_rank0
        return tqdm(iterable, **kw)

    def rng_state(self) -> dict:
        """This rank's random-number state: CPU, and the device's when on a GPU."""
        return {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


SINGLE = Parallel()


def current() -> Parallel:
    """The context of the layout megatron-core's groups describe now (``SINGLE`` without
    torch.distributed or before :func:`runtime.dist.init`)."""
    if not torch.distributed.is_initialized():
        return SINGLE
    from megatron.core import parallel_state as ps

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not ps.model_parallel_is_initialized():
        return Parallel(dp=world, rank=rank, world_size=world, dp_rank=rank, device=device)
    return Parallel(
        tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(), ep=ps.get_expert_model_parallel_world_size(),
        rank=rank, world_size=world, tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
        device=device, tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(), dp_group=ps.get_data_parallel_group(),
        expert_dp_group=ps.get_expert_data_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(),
        expert_tp_group=ps.get_expert_tensor_parallel_group())

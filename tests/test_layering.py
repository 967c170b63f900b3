"""Layering: only ``runtime/`` talks to the GPU, megatron-core's process groups and
torch.distributed's collectives; the rest of the package is handed a ``Parallel`` context.

Also the ``Parallel`` context of a process without torch.distributed.
"""

import re
from pathlib import Path

import pytest
import torch

import nemo_minitron
from nemo_minitron.runtime import parallel

PACKAGE = Path(nemo_minitron.__file__).parent

FORBIDDEN = {
    "parallel_state": re.compile(r"parallel_state"),
    "torch.cuda": re.compile(r"torch\.cuda"),
    "a torch.distributed collective": re.compile(
        r"import torch\.distributed as|torch\.distributed\.(all_reduce|all_gather|reduce|broadcast"
        r"|barrier|scatter|send|recv|isend|irecv)"),
}


def _outside_runtime() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if p.relative_to(PACKAGE).parts[0] != "runtime")


@pytest.mark.parametrize("what", sorted(FORBIDDEN))
def test_only_runtime_touches(what):
    pattern = FORBIDDEN[what]
    hits = [f"{p.relative_to(PACKAGE.parent)}:{i}: {line.strip()}"
            for p in _outside_runtime()
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, (f"{what} outside nemo_minitron/runtime/ (take it from the Parallel context "
                      "or a runtime function):\n" + "\n".join(hits))


def test_single_process_context(monkeypatch):
    # as in a process without torch.distributed, even if this test session started it
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    par = parallel.current()
    assert par is parallel.SINGLE
    assert (par.tp, par.pp, par.dp, par.ep, par.world_size) == (1, 1, 1, 1, 1)
    assert (par.rank, par.tp_rank, par.pp_rank, par.dp_rank) == (0, 0, 0, 0)
    assert par.is_rank0 and par.first_stage and par.last_stage
    assert par.layout == {"tp": 1, "pp": 1, "dp": 1}
    assert all(g is None for g in (par.tp_group, par.pp_group, par.dp_group,
                                   par.expert_dp_group, par.ep_group))
    assert par.device == "cpu" and par.torch_device is None


def test_stage_flags_and_rank0():
    last = parallel.Parallel(pp=2, pp_rank=1, rank=1, world_size=2)
    assert not last.first_stage and last.last_stage and not last.is_rank0
    first = parallel.Parallel(pp=2, world_size=2)
    assert first.first_stage and not first.last_stage and first.is_rank0


def test_progress_shows_on_rank0_only():
    assert not parallel.SINGLE.progress(range(3)).disable
    assert parallel.SINGLE.progress(range(3), disable=True).disable
    other = parallel.Parallel(rank=1, world_size=2, dp=2, dp_rank=1)
    bar = other.progress(range(3))
    assert bar.disable and list(bar) == [0, 1, 2]  # every rank still iterates


def test_rng_state_round_trip():
    state = parallel.SINGLE.rng_state()
    first = torch.rand(4)
    parallel.SINGLE.set_rng_state(state)
    assert torch.equal(torch.rand(4), first)

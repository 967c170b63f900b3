"""Layering: which part of the package may import which, and only ``runtime/`` talks to the GPU,
megatron-core's process groups and torch.distributed's collectives (the rest of the package is
handed a ``Parallel`` context).

Also the ``Parallel`` context of a process without torch.distributed.
"""

import ast
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


# Bottom to top. A module may import from its own top-level package or module and from any
# lower layer, never from its own layer or above (imports at module top and inside functions
# alike). ``__main__`` modules are commands: they sit above everything they drive.
LAYERS = [
    ("families", "artifacts", "dtypes"),  # foundation: tables and the atomic-file primitive
    ("arch",),  # the architecture record every stage agrees on
    ("config",),  # schemas, prune targets, the closed vocabularies; no torch
    ("assets", "data", "convert"),  # offline assets, datasets, checkpoint formats and weight maps
    ("runtime",),  # megatron-core: parallel context, model shards, forward, collectives
    ("demo", "importance", "report", "import_export"),  # report: tables, plots, judging scores
    ("evaluate",),  # held-out loss and tasks; writes its report
    ("recipe_record",),  # what a chained run directory was made with
    ("runs",),  # run-directory steps shared by search and pipeline
    ("pruning", "distill"),
    ("search",),
    ("preflight",),
    ("pipeline",),
    ("cli",),
    ("__main__",),
]
# (importing package, imported module): the exceptions, each with its reason
EXCEPTIONS = {
    ("config", "nemo_minitron.runtime.precision"):
        "model.dtype=auto is resolved when the job is built; the hardware probe is the runtime's "
        "(imported inside __post_init__, so the schema stays torch-free)",
}
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str:
    """``nemo_minitron.a.b`` -> ``a``; a ``__main__`` module is a command."""
    parts = module.split(".")
    return "__main__" if parts[-1] == "__main__" else parts[1]


def _module_of(path: Path) -> tuple[str, str]:
    """(dotted module name, the package its relative imports start from)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = ".".join(parts[:-1])
    return (package if parts[-1] == "__init__" else ".".join(parts)), package


def _is_module(name: str) -> bool:
    where = PACKAGE.parent.joinpath(*name.split("."))
    return where.is_dir() or where.with_suffix(".py").is_file()


def package_imports(path: Path):
    """(line, imported nemo_minitron module) for every import in ``path``, at any depth."""
    module, package = _module_of(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import mod` imports a module when pkg is a package
            names = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base
                     for a in node.names]
        else:
            continue
        for name in names:
            if name == "nemo_minitron" or name.startswith("nemo_minitron."):
                yield node.lineno, name


def _edges():
    """(importer unit, imported unit, imported module, where) over the package."""
    for p in sorted(PACKAGE.rglob("*.py")):
        src = _unit(_module_of(p)[0]) if p.parent != PACKAGE or p.stem != "__init__" else None
        for line, name in package_imports(p):
            if src is None or name == "nemo_minitron":
                continue
            dst = _unit(name)
            if dst != src:
                yield src, dst, name, f"{p.relative_to(PACKAGE.parent)}:{line}"


def test_every_part_has_a_layer():
    units = {_unit(_module_of(p)[0]) for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"}
    assert units <= set(LAYER_OF), f"add {sorted(units - set(LAYER_OF))} to LAYERS"


def test_imports_go_down_the_layers():
    broken = [f"{where}: {src} (layer {LAYER_OF[src]}) imports {name} (layer {LAYER_OF[dst]}); "
              f"{src} may import only from {sorted(u for u in LAYER_OF if LAYER_OF[u] < LAYER_OF[src])}"
              for src, dst, name, where in _edges()
              if LAYER_OF[dst] >= LAYER_OF[src]
              and not any(src == s and (name + ".").startswith(m + ".") for s, m in EXCEPTIONS)]
    assert not broken, "imports against the layering (tests/test_layering.py LAYERS):\n" + "\n".join(broken)


def test_no_cycle_between_packages():
    graph = {}
    for src, dst, _name, _where in _edges():
        graph.setdefault(src, set()).add(dst)
    done, path = set(), []

    def visit(unit):
        if unit in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(unit):] + [unit]))
        if unit in done:
            return
        path.append(unit)
        for nxt in sorted(graph.get(unit, ())):
            visit(nxt)
        path.pop()
        done.add(unit)

    for unit in sorted(graph):
        visit(unit)


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

"""Sharded training checkpoints: each tensor-parallel rank writes its own slices, nothing gathered.

A canonical checkpoint (:mod:`.checkpoint`) stores whole tensors, so a save at TP=k first gathers
every tensor of a pipeline stage onto one rank and one file writer. A periodic training checkpoint
(``train.sharded_save``, on by default) instead has every (tp, pp) rank of data-parallel rank 0
write its own slice of each tensor, under the canonical (Hugging Face) name, to its own file, in
parallel; a small index says where the pieces of every tensor lie::

    step_N/
      minitron.json, arch.json, tokenizer/, train_state/   as in every checkpoint
      model.sharded.json                 {"format", "layout": {"tp", "pp"}, "total_size",
                                          "tensors": {name: {"shape": full shape,
                                                             "dim": split dim (null: whole),
                                                             "pieces": [{"file", "start", "stop"}]}}}
      model-tp{t}-pp{p}.safetensors      rank (t, p)'s pieces: rows [start, stop) of ``dim``
      model-tp{t}-pp{p}-ep{e}.safetensors  the same under expert parallelism: a file per EP rank

A tensor replicated over TP (norms, router) is one whole piece written by TP rank 0; a vocabulary
split over TP drops its padded rows (pieces cover the real vocabulary only). Under expert
parallelism (EP > 1, MoE models) each EP rank's first replica (expert-data-parallel rank 0) writes
the experts it holds under their global canonical numbers, and the dense tensors, the same on
every EP rank, are written once, by data-parallel rank 0 (EP rank 0). The index format is the same
at every layout: pieces name their files, so readers never parse file names. The save is atomic
like any other (the same temporary directory, committed by rank 0 after every rank has written),
so a save killed midway leaves the previous checkpoint as the one a run resumes from.

:class:`ShardedTensors` reads a tensor, or one TP rank's part of it at any other TP/PP, from the
pieces that overlap it (safetensors slicing: a rank reads its slice, not the full tensor), and
:class:`~.checkpoint.Checkpoint` uses it for this layout, so every reader (resume, evaluate,
export, pre-flight's header checks) accepts a sharded checkpoint.

Why only periodic checkpoints: ``final/`` is what people share, export and continue from, so it
stays canonical (one name, one whole tensor, layout-free, HF-named); its one gather per run is
cheap next to a save every few hundred steps. Why only at TP > 1 or EP > 1: at TP = EP = 1 a
stage's tensors are already whole on the rank that writes them (no gather happens) and the
canonical layout is what every tool reads, so it is kept.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..arch import Arch
from ..artifacts import atomic
from . import checkpoint as ckpt
from .weights import EMBED, LAYER, expert_keys, from_megatron

INDEX = "model.sharded.json"
FORMAT = "nemo_minitron.sharded/1"


def piece_file(tp_rank: int, pp_rank: int, ep_rank: int = 0, ep: int = 1) -> str:
    """The file rank (tp, pp[, ep]) writes; the EP rank is named only when experts are split."""
    return f"model-tp{tp_rank}-pp{pp_rank}{f'-ep{ep_rank}' if ep > 1 else ''}.safetensors"


def rank_tensors(state: dict[str, torch.Tensor], arch: Arch, *, layers: range, pre_process: bool,
                 post_process: bool, te: bool, tp_size: int, ep_rank: int = 0, ep: int = 1,
                 dense: bool = True, experts: bool = True) -> dict[str, torch.Tensor]:
    """One rank's megatron-core ``state`` as the canonical-named slices it writes: its local
    experts under their global numbers (EP rank ``ep_rank`` of ``ep`` holds a contiguous block),
    only the experts when ``dense`` is false (another rank writes the tensors every EP rank
    holds), only the dense tensors when ``experts`` is false (another replica writes them). A
    tied embedding is stored once, by the first pipeline stage."""
    held = range(ep_rank * arch.num_experts // ep, (ep_rank + 1) * arch.num_experts // ep) \
        if arch.is_moe else range(0)
    local = from_megatron([state], arch, layers=layers, pre_process=pre_process,
                          post_process=post_process, te=te, tp_size=tp_size, experts=held)
    if not pre_process:
        local.pop(EMBED, None)
    names = {LAYER.format(i) + x for i in layers for j in held for x in expert_keys(arch, j)}
    return {k: v for k, v in local.items() if (experts if k in names else dense)}


# ----------------------------------------------------------------------------------------------
# writing


def pieces(local: dict[str, torch.Tensor], full: dict[str, tuple], tp_rank: int,
           ) -> dict[str, tuple[torch.Tensor, int | None, int, int]]:
    """name -> (piece, split dim, start, stop) for this TP rank's canonical tensors ``local``
    (``full``: the whole tensors' shapes). The split dim is the one where the local tensor is
    smaller than the whole one, or, for a vocabulary, where it holds padded rows past it; TP
    ranks hold equal parts, so rank ``r``'s part starts at ``r`` times its size. A tensor no
    smaller than the whole one is replicated: TP rank 0 keeps it (others get nothing)."""
    out = {}
    for name, t in local.items():
        want = tuple(full[name])
        dims = [d for d in range(t.dim()) if t.shape[d] != want[d]]
        if not dims:
            if tp_rank == 0:
                out[name] = (t, None, 0, want[0] if want else 1)
            continue
        (dim,) = dims
        start = tp_rank * t.shape[dim]
        stop = min(start + t.shape[dim], want[dim])
        if stop > start:  # a rank holding padded vocabulary rows only writes nothing
            out[name] = (t.narrow(dim, 0, stop - start), dim, start, stop)
    return out


def write_pieces(tmp: Path, name: str, found: dict) -> dict[str, dict]:
    """Write :func:`pieces` to ``tmp/name``; returns their index entries (for :func:`write_index`)."""
    from safetensors.torch import save_file

    save_file({k: v[0].contiguous() for k, v in found.items()}, str(tmp / name),
              metadata={"format": "pt"})
    return {k: {"dim": d, "file": name, "start": s, "stop": e} for k, (_, d, s, e) in found.items()}


def merge(entries: list[dict[str, dict]], shapes: dict[str, tuple]) -> dict[str, dict]:
    """One index entry per tensor from every rank's :func:`write_pieces` entries, checking that
    each tensor's pieces cover it exactly once."""
    tensors: dict[str, dict] = {}
    for rank_entries in entries:
        for name, e in rank_entries.items():
            t = tensors.setdefault(name, {"shape": list(shapes[name]), "dim": e["dim"],
                                          "pieces": []})
            t["pieces"].append({k: e[k] for k in ("file", "start", "stop")})
    for name, t in tensors.items():
        t["pieces"].sort(key=lambda p: p["start"])
        _check_cover(name, t)
    return dict(sorted(tensors.items()))


def write_index(tmp: Path, tensors: dict[str, dict], layout: dict) -> None:
    files = {p["file"] for t in tensors.values() for p in t["pieces"]}
    total = sum((tmp / f).stat().st_size for f in files)
    atomic.write_json(tmp / INDEX, {"format": FORMAT, "layout": layout, "total_size": total,
                                    "tensors": tensors})


def _check_cover(name: str, t: dict) -> None:
    n = t["shape"][t["dim"]] if t["dim"] is not None else None
    at = 0
    for p in t["pieces"]:
        if p["start"] != at:
            raise ckpt.CheckpointError(f"{name}: its pieces leave rows {at}..{p['start']} "
                                       "uncovered or overlap; re-create the checkpoint")
        at = p["stop"]
    if (n is None and len(t["pieces"]) != 1) or (n is not None and at != n):
        raise ckpt.CheckpointError(f"{name}: its pieces cover {at} of {n} rows; re-create "
                                   "the checkpoint")


# ----------------------------------------------------------------------------------------------
# reading


def is_sharded(path) -> bool:
    return (Path(path) / INDEX).is_file()


class ShardedTensors:
    """The tensors of a sharded checkpoint directory, read piece by piece on demand."""

    def __init__(self, path):
        self.path = Path(path)
        index = ckpt.read_json(self.path / INDEX)
        if index.get("format") != FORMAT or not isinstance(index.get("tensors"), dict):
            raise ckpt.CheckpointError(f"{self.path / INDEX} is not a {FORMAT} index; "
                                       "re-create the checkpoint")
        self.tensors: dict[str, dict] = index["tensors"]
        self.layout = index.get("layout", {})
        self._open: dict[str, object] = {}

    def files(self) -> list[str]:
        return sorted({p["file"] for t in self.tensors.values() for p in t["pieces"]})

    def _slice(self, file: str, name: str):
        from safetensors import safe_open

        if file not in self._open:
            self._open[file] = safe_open(str(self.path / file), framework="pt")
        return self._open[file].get_slice(name)

    def stored_dtype(self, name: str) -> str:
        return self._slice(self.tensors[name]["pieces"][0]["file"], name).get_dtype()

    def read(self, name: str, dim: int = 0, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Rows ``[lo, hi)`` of tensor ``name`` along ``dim`` (all of it by default), the other
        dims whole, read only from the pieces that overlap them."""
        if name not in self.tensors:
            raise ckpt.CheckpointError(f"{self.path} has no tensor {name!r}")
        t = self.tensors[name]
        shape, pdim = t["shape"], t["dim"]
        hi = shape[dim] if hi is None else hi
        parts = []
        for p in t["pieces"]:
            index = [slice(None)] * len(shape)
            if pdim == dim:
                a, b = max(p["start"], lo), min(p["stop"], hi)
                if a >= b:
                    continue
                index[dim] = slice(a - p["start"], b - p["start"])
            elif len(shape):
                index[dim] = slice(lo, hi)
            parts.append(self._slice(p["file"], name)[tuple(index)])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=pdim)

    def part(self, name: str, dim: int, rank: int, parts: int) -> torch.Tensor:
        """Part ``rank`` of ``parts`` equal parts along ``dim`` (a TP rank's shard)."""
        n = self.tensors[name]["shape"][dim]
        if n % parts:
            raise ckpt.CheckpointError(f"{name} has {n} rows along dim {dim}, not divisible into "
                                       f"{parts}")
        return self.read(name, dim, rank * n // parts, (rank + 1) * n // parts)

    def verify(self, want: dict[str, tuple]) -> None:
        """Index shapes against the architecture's, pieces against the files' headers (headers
        only: a truncated or mismatched file is reported before a model is built)."""
        headers = {f: ckpt.safetensors_header(self.path / f) for f in self.files()}
        for name, t in self.tensors.items():
            if tuple(t["shape"]) != tuple(want[name]):
                raise ckpt.CheckpointError(
                    f"{self.path / ckpt.ARCH} disagrees with {INDEX}: {name} is {tuple(t['shape'])}"
                    f", arch.json implies {tuple(want[name])}; re-create the checkpoint")
            _check_cover(name, t)
            for p in t["pieces"]:
                expect = list(t["shape"])
                if t["dim"] is not None:
                    expect[t["dim"]] = p["stop"] - p["start"]
                got = headers[p["file"]].get(name, {}).get("shape")
                if got != expect:
                    raise ckpt.CheckpointError(
                        f"{self.path / p['file']} holds {name} as {got}, {INDEX} says "
                        f"{expect}; re-create the checkpoint")

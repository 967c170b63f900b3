"""Combine per-rank activation statistics into one global importance ranking on every rank.

* data parallel: raw moments are summed (all-reduce over the DP group) before any score is taken;
* tensor parallel: neuron and head scores are sharded, so they are all-gathered and concatenated
  in global index order; hidden-channel and block statistics are replicated and taken as they are;
* pipeline parallel: each stage fills its own layers of global [layers, ...] tensors and the
  stages' tensors are summed, as are the per-stage sums of hidden-channel scores;
* expert parallel: expert statistics are summed over the expert-data-parallel group (ranks
  holding the same experts; token dispatch already brings every EP rank's tokens to an expert)
  and concatenated in global expert order over the expert-parallel group; under tensor
  parallelism an expert's neurons are split over the expert-TP group and concatenated like the
  dense ones, while its routed-token statistics are taken from whole outputs
  (:func:`.hooks.whole_output`) and so are the same on every rank of that group.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..artifacts.atomic import write_file
from ..runtime.collectives import all_gather_cat, all_reduce_sum, size_rank
from ..runtime.parallel import Parallel, current
from .hooks import ActivationStats
from .scores import Moments, batch_aggregate, expert_neuron_scores, expert_scores

HIDDEN_AXES = ("hidden_attn", "hidden_mlp", "hidden_final")


SCORES_FILE = "importance.safetensors"
SCORES_FORMAT = "nemo_minitron.importance/1"


@dataclass
class Importance:
    ffn: torch.Tensor  # [layers, ffn_hidden_size]
    heads: torch.Tensor  # [layers, num_attention_heads]
    hidden: torch.Tensor  # [hidden_size], summed over every norm output
    block: torch.Tensor  # [layers], Block Importance 1 - cos
    meta: dict = field(default_factory=dict)
    experts: Optional[torch.Tensor] = None  # [layers, num_experts] (MoE; ffn then scores the
    # experts' common neurons, aggregated over experts)
    shared_ffn: Optional[torch.Tensor] = None  # [layers, moe_shared_expert_intermediate_size]

    def save(self, path) -> None:
        """Atomically, as safetensors with the meta as JSON (nothing read back is unpickled): the
        search calibrates once and every candidate reads this file."""
        tensors = {k: v.detach().contiguous() for k, v in self._tensors().items() if v is not None}
        meta = {"meta": json.dumps(self.meta), "format": SCORES_FORMAT}
        write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def _tensors(self) -> dict[str, Optional[torch.Tensor]]:
        return {"ffn": self.ffn, "heads": self.heads, "hidden": self.hidden, "block": self.block,
                "experts": self.experts, "shared_ffn": self.shared_ffn}

    @classmethod
    def load(cls, path) -> "Importance":
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"prune.scores={path}: importance scores are read from the "
                             f"{SCORES_FILE} a `minitron prune` writes (older .pt files are "
                             "pickles and are not read); re-run the prune that made it")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != SCORES_FORMAT:
                raise ValueError(f"prune.scores={path} is not a {SCORES_FILE} of this tool "
                                 f"(format {meta.get('format')!r}); re-run `minitron prune`")
            t = {k: f.get_tensor(k) for k in f.keys()}
        return cls(t["ffn"], t["heads"], t["hidden"], t["block"], json.loads(meta["meta"]),
                   t.get("experts"), t.get("shared_ffn"))


# A group of None (no torch.distributed) holds complete statistics: nothing to combine.

def _sum_over(group, t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t.clone(), group) if size_rank(group)[0] > 1 else t


def _gather_cat(group, t: torch.Tensor) -> torch.Tensor:
    return all_gather_cat(t, group) if size_rank(group)[0] > 1 else t


def reduce_expert_stats(stats: ActivationStats, shard, how: str,
                        par: Parallel) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert scores [layers, experts], neuron scores [layers, ffn]) of an MoE model."""
    arch, edp, ep, etp = shard.arch, par.expert_dp_group, par.ep_group, par.expert_tp_group
    L, E, F = arch.num_layers, arch.num_experts, arch.ffn_hidden_size
    routed = torch.zeros(L, E, 3, dtype=torch.float64)
    sumsq = torch.zeros(L, E, F, dtype=torch.float64)
    for local, g in enumerate(shard.layers):
        routed[g] = _gather_cat(ep, _sum_over(edp, stats.sums[("expert", local)]))
        neurons = _sum_over(edp, stats.sums[("expert_ffn", local)])  # [local experts, F/tp]
        sumsq[g] = _gather_cat(ep, all_gather_cat(neurons, etp, dim=-1))
    return expert_scores(routed, how), expert_neuron_scores(sumsq)


def reduce_stats(stats: ActivationStats, shard, batch_agg: str = "l2",
                 expert_score: str = "contribution", par: Parallel | None = None) -> Importance:
    """Global :class:`Importance` from this rank's stats; a collective over all ranks of ``par``
    (default: the live layout)."""
    par = par or current()
    dp_group, tp_group, pp_group = par.dp_group, par.tp_group, par.pp_group
    keys = sorted(stats.moments)
    flat = torch.cat([stats.moments[k].flat() for k in keys]) if keys else torch.zeros(0)
    flat = _sum_over(dp_group, flat)
    moments, o = {}, 0
    for k in keys:
        n = stats.moments[k].flat().numel()
        moments[k] = Moments.from_flat(flat[o:o + n])
        o += n

    arch = shard.arch
    L = arch.num_layers
    ffn = torch.zeros(L, arch.ffn_hidden_size, dtype=torch.float64)
    heads = torch.zeros(L, arch.num_attention_heads, dtype=torch.float64)
    block = torch.zeros(L, dtype=torch.float64)
    hidden = torch.zeros(arch.hidden_size, dtype=torch.float64)
    experts = None
    shared = torch.zeros(L, arch.moe_shared_expert_intermediate_size, dtype=torch.float64)
    if arch.is_moe:
        experts, ffn = reduce_expert_stats(stats, shard, expert_score, par)
    for local, g in enumerate(shard.layers):
        if not arch.is_moe:
            ffn[g] = _gather_cat(tp_group, batch_aggregate(moments[("ffn", local)], batch_agg))
        if arch.has_shared_expert:
            shared[g] = _gather_cat(tp_group, batch_aggregate(moments[("shared_ffn", local)],
                                                              batch_agg))
        heads[g] = _gather_cat(tp_group, batch_aggregate(moments[("heads", local)], batch_agg))
        block[g] = batch_aggregate(moments[("block", local)], "mean")[0]
    for (axis, _), m in moments.items():
        if axis in HIDDEN_AXES:
            hidden += batch_aggregate(m, batch_agg)
    ffn, heads, block, hidden, shared = (_sum_over(pp_group, t)
                                         for t in (ffn, heads, block, hidden, shared))
    samples = int(_sum_over(dp_group, torch.tensor([float(stats.samples)]))[0])
    meta = {"seq_agg": stats.seq_agg, "batch_agg": batch_agg, "samples": samples}
    if experts is not None:
        experts = _sum_over(pp_group, experts).float()
        meta["expert_score"] = expert_score
    return Importance(ffn.float(), heads.float(), hidden.float(), block.float(), meta, experts,
                      shared.float() if arch.has_shared_expert else None)

"""Importance scores as pure functions of activation statistics (Minitron, arXiv 2407.14679 §2.2).

An activation ``x`` of shape [batch, seq, K] is reduced over the sequence per sample
(:func:`sequence_aggregate`), and those per-sample values are accumulated as additive moments
(:class:`Moments`: count, sum, sum of squares), so micro-batches and data-parallel ranks combine by
addition. :func:`batch_aggregate` turns the moments into one score per index. Default: sequence =
mean of |x|, batch = L2 norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.constants import BATCH_AGGS, SEQUENCE_AGGS


def sequence_aggregate(x: torch.Tensor, how: str = "mean_abs") -> torch.Tensor:
    """[batch, seq, K] -> [batch, K]."""
    x = x.float()
    if how == "mean_abs":
        return x.abs().mean(dim=1)
    if how == "mean":
        return x.mean(dim=1)
    if how == "l2":
        return x.pow(2).sum(dim=1).sqrt()
    if how == "var":
        return x.var(dim=1, unbiased=False)
    raise ValueError(f"sequence aggregation {how!r} unknown; use one of {SEQUENCE_AGGS}")


@dataclass
class Moments:
    """Additive per-index moments of per-sample values: combine by summing fields."""

    count: torch.Tensor  # scalar, float64
    sum: torch.Tensor  # [K], float64
    sumsq: torch.Tensor  # [K], float64

    @classmethod
    def zeros(cls, k: int) -> "Moments":
        return cls(torch.zeros((), dtype=torch.float64), torch.zeros(k, dtype=torch.float64),
                   torch.zeros(k, dtype=torch.float64))

    def add(self, per_sample: torch.Tensor) -> None:
        """Accumulate a [batch, K] tensor of per-sample values."""
        v = per_sample.detach().to(torch.float64).cpu()
        self.count += v.shape[0]
        self.sum += v.sum(dim=0)
        self.sumsq += v.pow(2).sum(dim=0)

    def flat(self) -> torch.Tensor:
        return torch.cat([self.count.reshape(1), self.sum, self.sumsq])

    @classmethod
    def from_flat(cls, t: torch.Tensor) -> "Moments":
        k = (t.numel() - 1) // 2
        return cls(t[0].clone(), t[1:1 + k].clone(), t[1 + k:].clone())


def batch_aggregate(m: Moments, how: str = "l2") -> torch.Tensor:
    """Moments of per-sample values -> one score per index."""
    if how == "l2":
        return m.sumsq.sqrt()
    n = m.count.clamp(min=1)
    mean = m.sum / n
    if how == "mean":
        return mean
    if how == "var":
        return (m.sumsq / n - mean.pow(2)).clamp(min=0)
    raise ValueError(f"batch aggregation {how!r} unknown; use one of {BATCH_AGGS}")


def head_norms(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Attention output before the output projection [b, s, heads*d] -> per-head L2 norms [b, s, heads]."""
    b, s, hd = x.shape
    return x.float().reshape(b, s, hd // head_dim, head_dim).norm(dim=-1)


def block_importance(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Per-sample Block Importance 1 - cos(x_in, x_out) averaged over tokens: [b, s, h] -> [b, 1]."""
    cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
    return (1 - cos).mean(dim=1, keepdim=True)


def group_scores(head_scores: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Query-group importance = sum of the importance of its heads: [..., heads] -> [..., groups]."""
    *lead, h = head_scores.shape
    return head_scores.reshape(*lead, num_groups, h // num_groups).sum(dim=-1)


# ------------------------------------------------------------------ mixture of experts
EXPERT_SCORES = ("contribution", "mean_norm")
EXPERT_STATS = 3
"""Per expert, additive: [tokens routed, sum of ||y||, sum of p * ||y||], with y the expert's
output for a token and p the routing weight that token gave it."""


def expert_token_stats(weighted_out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """One expert's additive statistics from its outputs already scaled by their routing
    weights ([tokens, hidden], as megatron's experts return them) and those weights [tokens]."""
    n = weighted_out.float().norm(dim=-1)  # p * ||y||
    p = probs.float()
    plain = torch.where(p > 0, n / p.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(n))
    return torch.stack([torch.tensor(float(n.shape[0])), plain.sum(), n.sum()]).double()


def expert_scores(stats: torch.Tensor, how: str = "contribution") -> torch.Tensor:
    """[..., experts, 3] statistics -> [..., experts] importance.

    contribution (default): sum over tokens of p * ||y||, the magnitude the expert adds to the
    residual stream -- what the layer loses when the expert goes, counting both how often it is
    chosen and how strongly it then acts (the MoE reading of Minitron's activation magnitude).
    mean_norm: sum of ||y|| / tokens routed, NVIDIA ModelOpt's score; it ignores how often an
    expert is chosen, so a rarely used expert with large outputs ranks high.
    """
    if how == "contribution":
        return stats[..., 2]
    if how == "mean_norm":
        return stats[..., 1] / stats[..., 0].clamp(min=1)
    raise ValueError(f"expert score {how!r} unknown; use one of {EXPERT_SCORES}")


def expert_neuron_scores(sumsq: torch.Tensor) -> torch.Tensor:
    """[..., experts, ffn] sums of squared down-projection inputs (routing-weighted, over the
    tokens each expert saw) -> [..., ffn]: the L2 norm over every (token, expert) pair. Experts
    keep one common width and the same neuron indices, so neuron j is scored over all experts."""
    return sumsq.sum(dim=-2).sqrt()

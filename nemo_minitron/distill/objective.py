"""What the trainer minimises on the last pipeline stage: the pluggable objective.

Distillation reads its logit/LM terms straight from ``KDConfig`` (one KD representation, no copy
of its fields); teacher correction (finetune) is the same objective without ``kd``: the LM loss
alone. The loss function returns ``(total, tokens, report)`` as megatron-core's pipeline
schedules expect; ``report`` holds token sums that :func:`reduce_reports` turns into the
token-weighted means metrics.jsonl records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..runtime.forward import all_reduce_sum, sum_from_last_stage
from ..runtime.selected_logits import OutputHidden
from . import losses as L

REPORTED = ("loss", "kd", "lm")


@dataclass(frozen=True)
class Objective:
    """``kd``: the run's KDConfig, or None for the LM loss alone. ``vocab_size``: the true
    vocabulary (padding columns are masked). ``tp_group``: the tensor-parallel group of the
    vocabulary shards (None at tp=1)."""

    kd: Any
    vocab_size: int
    tp_group: Any = None

    @property
    def cached(self) -> bool:
        """The teacher's top-k come with each batch (kd.teacher_cache): no teacher is built."""
        return self.kd is not None and bool(self.kd.teacher_cache)

    @property
    def fused_output(self) -> bool:
        """Whether the pair should hand over final hidden states and output weights instead of
        logits (kd.fused_output, with a live teacher and no LM term)."""
        kd = self.kd
        return (kd is not None and kd.fused_output and bool(kd.logit_weight)
                and not kd.lm_weight and not self.cached)

    def _logit_term(self, student, teacher, batch, mask):
        kd = self.kd
        if isinstance(student, OutputHidden):  # both output layers folded into the chunks
            return L.fused_output_kl(student.hidden, student.weight,
                                     teacher.hidden, teacher.weight,
                                     temperature=kd.temperature, mask=mask,
                                     tp_group=self.tp_group, vocab_size=self.vocab_size,
                                     top_k=kd.top_k, kind=kd.kind,
                                     chunk_tokens=kd.chunk_tokens or 0)[0]
        if self.cached:
            return L.cached_topk_kl(student, batch["cache_ids"], batch["cache_logp"],
                                    batch["cache_rest"], temperature=kd.temperature, mask=mask,
                                    vocab_size=self.vocab_size, residual=kd.cache_residual,
                                    tp_group=self.tp_group,
                                    chunk_tokens=kd.chunk_tokens)[0]
        return L.logits_kl(student, teacher, temperature=kd.temperature, mask=mask,
                           tp_group=self.tp_group, vocab_size=self.vocab_size, top_k=kd.top_k,
                           kind=kd.kind, chunk_tokens=kd.chunk_tokens)[0]

    def loss_func(self, batch: dict, output):
        """``total = logit_weight * KD + lm_weight * LM`` (finetune: ``LM``) summed over the
        micro-batch's tokens, plus the stage's weighted intermediate losses when the pair
        returns them (reported separately, not in ``report["loss"]``)."""
        student, teacher, extra = (output + (None,) * 3)[:3] if isinstance(output, tuple) \
            else (output, None, None)
        mask = batch["loss_mask"].float()
        total = mask.new_zeros((), dtype=torch.float32)
        report = {}
        ntok = mask.sum()
        kd = self.kd
        if kd is not None and kd.logit_weight and (self.cached or teacher is not None):
            kd_sum = self._logit_term(student, teacher, batch, mask)
            total = total + kd.logit_weight * kd_sum
            report["kd"] = torch.stack([kd_sum.detach().float(), ntok])
        lm_weight = 1.0 if kd is None else kd.lm_weight
        if lm_weight:
            if isinstance(student, OutputHidden):
                student = student.logits()
            lm_sum, _ = L.lm_loss(student, batch["labels"], mask=mask, tp_group=self.tp_group,
                                  vocab_size=self.vocab_size)
            total = total + lm_weight * lm_sum
            report["lm"] = torch.stack([lm_sum.detach().float(), ntok])
        report["loss"] = torch.stack([total.detach().float(), ntok])
        if extra is not None:
            total = total + extra
        return total, ntok.int(), report


def reduce_reports(reports: list[dict], par, stage_sums: dict[str, float] | None = None
                   ) -> dict[str, float]:
    """Token-weighted means of the last stage's reports, the same on every rank.

    ``par``: the run's ``Parallel`` context. ``stage_sums``: name -> this rank's token sum of a
    loss computed on any pipeline stage (the intermediate losses); summed over all stages and
    data-parallel replicas (TP rank 0 counts, the others hold copies) and divided by the last
    stage's token count. Every rank passes the same names.
    """
    def fill(t):
        for r in reports:
            for i, n in enumerate(REPORTED):
                if n in r:
                    t[i] += r[n].detach().double().cpu()

    t = sum_from_last_stage(fill, (len(REPORTED), 2))
    out = {n: (t[i, 0] / t[i, 1]).item() for i, n in enumerate(REPORTED) if t[i, 1] > 0}
    if stage_sums:
        keys = sorted(stage_sums)
        s = all_reduce_sum(torch.tensor(
            [stage_sums[k] if par.tp_rank == 0 else 0.0 for k in keys], dtype=torch.float64))
        out.update({k: (v / t[0, 1]).item() for k, v in zip(keys, s) if t[0, 1] > 0})
    return out

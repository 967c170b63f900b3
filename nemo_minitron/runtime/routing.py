"""How evenly an MoE model's routers spread tokens over experts, for the training logs.

A forward hook on every router counts the tokens each expert was chosen for; :meth:`pop` turns
the counts since the last call into load figures (summed over data-parallel ranks, gathered over
pipeline stages) and starts again. Load of an expert = its share of the layer's routed tokens
times the number of experts: 1 everywhere is perfect balance, ``max_load`` 2 means some expert
got twice its fair share, ``min_load`` 0 that some expert got nothing (a dead expert).

With ``train.moe_aux_loss_coeff`` > 0 the routers also add megatron-core's load-balancing loss
to the objective: its gradient is attached in the forward (no separate loss tensor reaches the
schedule) and its value is recorded in megatron's per-layer tracker, which
:meth:`RoutingMonitor.take_aux_loss` reads and clears once per step.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

# megatron-core is imported inside the functions that use it: importing it takes seconds, and this
# module is imported (by the stages, preflight, the tests) long before a model is built.


def load_balance(counts: torch.Tensor) -> dict[str, float]:
    """[layers, experts] routed-token counts -> worst max load, lowest min load, and the mean
    over layers of the coefficient of variation of the counts."""
    counts = counts.double()
    load = counts * counts.shape[1] / counts.sum(dim=1, keepdim=True).clamp(min=1)
    cv = counts.std(dim=1, unbiased=False) / counts.mean(dim=1).clamp(min=1e-12)
    return {"moe_max_load": float(load.max()), "moe_min_load": float(load.min()),
            "moe_load_cv": float(cv.mean())}


class RoutingMonitor:
    """Counts routed tokens per (layer, expert) of a :class:`~.shard.ModelShard` while it runs."""

    def __init__(self, shard, aux_loss_coeff: float = 0.0):
        self.arch, self.layers = shard.arch, list(shard.layers)
        self.aux_loss_coeff = aux_loss_coeff if shard.arch.is_moe else 0.0
        self.counts = torch.zeros(shard.arch.num_layers, shard.arch.num_experts, dtype=torch.float64)
        self.handles = []
        if not shard.arch.is_moe:
            return
        for local, layer in enumerate(shard.model.decoder.layers):
            self.handles.append(layer.mlp.router.register_forward_hook(self._hook(self.layers[local])))

    def _hook(self, layer: int):
        def hook(module, _args, out):
            if not module.training:  # validation passes are not training's load
                return
            routing_map = out[1]  # [tokens, experts] bool: which experts each token goes to
            self.counts[layer] += routing_map.detach().sum(dim=0).to(torch.float64).cpu()
        return hook

    def pop(self) -> dict[str, float]:
        """Load figures since the last call ({} for a dense model); a collective on all ranks."""
        if not self.arch.is_moe:
            return {}
        counts, self.counts = self.counts, torch.zeros_like(self.counts)
        if tdist.is_initialized():
            from megatron.core import parallel_state as ps

            for group in (ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group()):
                if tdist.get_world_size(group) > 1:
                    tdist.all_reduce(counts, group=group)
        return load_balance(counts)

    def take_aux_loss(self, num_microbatches: int) -> dict[str, float]:
        """This step's load-balancing loss ({} when off): ``moe_aux_loss``, the per-layer loss
        averaged over layers, micro-batches and data-parallel ranks (1 for an even spread), and
        ``moe_aux_term``, what it added to the objective (coefficient x the sum over layers).
        A collective on all ranks; the tracker starts again from zero."""
        if not self.aux_loss_coeff:
            return {}
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        entry = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
        per_layer = torch.zeros(self.arch.num_layers, dtype=torch.float64)
        if entry is not None:  # indexed by global layer; each pipeline stage fills its own
            per_layer += entry["values"].detach().double().cpu()
            entry["values"].zero_()
        per_layer /= num_microbatches
        if tdist.is_initialized():
            from megatron.core import parallel_state as ps

            pp, dp = ps.get_pipeline_model_parallel_group(), ps.get_data_parallel_group()
            for group in (pp, dp):
                if tdist.get_world_size(group) > 1:
                    tdist.all_reduce(per_layer, group=group)
            per_layer /= tdist.get_world_size(dp)
        return {"moe_aux_loss": float(per_layer.mean()),
                "moe_aux_term": self.aux_loss_coeff * float(per_layer.sum())}

    def close(self) -> None:
        for h in self.handles:
            h.remove()

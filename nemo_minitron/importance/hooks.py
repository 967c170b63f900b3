"""Forward hooks on megatron-core modules that record activation statistics for every axis at once.

One calibration pass fills, for each layer this pipeline stage holds:
  ffn     input of ``mlp.linear_fc2`` (this TP rank's neurons)
  heads   input of ``self_attention.linear_proj``, per head (this TP rank's heads)
  hidden  outputs of ``input_layernorm`` and ``pre_mlp_layernorm`` (and ``final_layernorm``);
          under the Transformer Engine spec those two are identities and the norm runs fused
          inside the next linear (``LayerNormLinear``), so its output is recomputed from that
          linear's input and ``layer_norm_weight`` (:func:`fused_norm_output`)
  block   1 - cos(layer input, layer output) (Block Importance)
as additive :class:`~.scores.Moments`, so micro-batches and ranks combine by summing.
A mixture-of-experts layer has no single MLP: per local expert its routed tokens' statistics
(:func:`~.scores.expert_token_stats`, from the expert's routing-weighted output) and the sums of
squares of its down-projection inputs, as plain additive tensors in ``stats.sums``; its pre-MLP
norm (the router's and the experts' input) is scored for the hidden channels. A shared expert's
neurons (``shared_ffn``) are scored like a dense MLP's, from its down-projection input times the
token's sigmoid gate: the gate scales all neurons of a token alike, so it weighs tokens by how
much the shared expert adds to them, as routing weights do for the routed experts' neurons.
megatron-core activations are [seq, batch, ...]; they are transposed to [batch, seq, ...] here.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..runtime.collectives import all_reduce_sum
from ..runtime.parallel import current
from .scores import (EXPERT_STATS, Moments, block_importance, expert_token_stats, head_norms,
                     sequence_aggregate)


class ActivationStats:
    """Moments per (axis, local layer index); ``final`` norm under layer index -1."""

    def __init__(self, seq_agg: str = "mean_abs"):
        self.seq_agg = seq_agg
        self.moments: dict[tuple[str, int], Moments] = {}
        self.sums: dict[tuple[str, int], torch.Tensor] = {}
        self.samples = 0

    def add(self, axis: str, layer: int, per_sample: torch.Tensor) -> None:
        key = (axis, layer)
        if key not in self.moments:
            self.moments[key] = Moments.zeros(per_sample.shape[-1])
        self.moments[key].add(per_sample)

    def add_sum(self, axis: str, layer: int, shape: tuple, index: int, value: torch.Tensor) -> None:
        """``sums[(axis, layer)][index] += value`` in float64, made with ``shape`` on first use."""
        key = (axis, layer)
        if key not in self.sums:
            self.sums[key] = torch.zeros(shape, dtype=torch.float64)
        self.sums[key][index] += value.detach().to(torch.float64).cpu()

    def layers(self, axis: str) -> list[int]:
        return sorted(layer for a, layer in self.moments if a == axis)


def _bsk(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1)


def fused_norm_linear(norm: torch.nn.Module, linear: torch.nn.Module) -> bool:
    """True when ``norm`` is a parameter-free stand-in (``IdentityOp``) because ``linear`` applies
    the norm itself (TE's ``LayerNormLinear`` carries ``layer_norm_weight``)."""
    has_params = next(norm.parameters(), None) is not None
    return not has_params and getattr(linear, "layer_norm_weight", None) is not None


def fused_norm_output(linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the norm fused into ``linear`` outputs for input ``x``: the tensor a separate norm
    module would have returned (in fp32, cast back to ``x``'s dtype as that module would)."""
    cfg = linear.config
    w = linear.layer_norm_weight.float()
    if getattr(cfg, "layernorm_zero_centered_gamma", False):
        w = w + 1.0
    xf = x.float()
    if cfg.normalization == "RMSNorm":
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + cfg.layernorm_epsilon) * w
    else:
        bias = getattr(linear, "layer_norm_bias", None)
        y = torch.nn.functional.layer_norm(xf, (xf.shape[-1],), w,
                                           None if bias is None else bias.float(),
                                           cfg.layernorm_epsilon)
    return y.to(x.dtype)


def whole_output(partial: torch.Tensor, expert_tp_group) -> torch.Tensor:
    """An expert's output as one process would compute it. When tensor parallelism splits the
    expert's width, each rank's down-projection returns a partial sum that megatron reduces only
    after the tokens go back (in the dispatcher); a token's output norm needs the whole sum. Every
    rank of the group runs the same experts on the same gathered tokens in the same order, so the
    sum is taken here, per expert, on each of them."""
    return all_reduce_sum(partial.detach().clone(), expert_tp_group)


@contextmanager
def collecting(shard, seq_agg: str = "mean_abs"):
    """Register the hooks on ``shard.model`` for the duration of the block; yields the stats."""
    stats = ActivationStats(seq_agg)
    handles = []
    d = shard.arch.head_dim
    decoder = shard.model.decoder

    def pre_hook(axis, i, fn=None):
        def hook(_module, args):
            x = _bsk(args[0])
            stats.add(axis, i, sequence_aggregate(fn(x) if fn else x, seq_agg))
        return hook

    def out_hook(axis, i):
        def hook(_module, _args, out):
            out = out[0] if isinstance(out, tuple) else out
            stats.add(axis, i, sequence_aggregate(_bsk(out), seq_agg))
        return hook

    def norm_hooks(norm, linear, axis, i):
        if fused_norm_linear(norm, linear):
            return linear.register_forward_pre_hook(
                pre_hook(axis, i, lambda x: fused_norm_output(linear, x)))
        return norm.register_forward_hook(out_hook(axis, i))

    def block_hook(i):
        def hook(_module, args, kwargs, out):
            x_in = kwargs.get("hidden_states", args[0] if args else None)
            x_out = out[0] if isinstance(out, tuple) else out
            stats.add("block", i, block_importance(_bsk(x_in), _bsk(x_out)))
            if i == 0:
                stats.samples += x_in.shape[1]
        return hook

    def expert_hooks(i, experts):
        n, ffn = len(experts), experts[0].linear_fc2.weight.shape[1]
        etp = current().expert_tp_group

        def routed(k):
            def hook(_module, args, out):
                stats.add_sum("expert", i, (n, EXPERT_STATS), k,
                              expert_token_stats(whole_output(out[0], etp), args[1]))
            return hook

        def neurons(k):
            def hook(_module, args):
                stats.add_sum("expert_ffn", i, (n, ffn), k, args[0].float().pow(2).sum(dim=0))
            return hook

        for k, e in enumerate(experts):
            handles.append(e.register_forward_hook(routed(k)))
            handles.append(e.linear_fc2.register_forward_pre_hook(neurons(k)))

    def shared_hooks(i, shared):
        gates = []

        def gate(module, args):  # runs first: the gate score of every token, [s, b, 1]
            gates[:] = [torch.sigmoid(torch.nn.functional.linear(args[0], module.gate_weight))]

        handles.append(shared.register_forward_pre_hook(gate))
        handles.append(shared.linear_fc2.register_forward_pre_hook(
            pre_hook("shared_ffn", i, lambda x: x * _bsk(gates.pop()))))

    for i, layer in enumerate(decoder.layers):
        if shard.arch.is_moe:
            expert_hooks(i, layer.mlp.experts.local_experts)
            if shard.arch.has_shared_expert:
                shared_hooks(i, layer.mlp.shared_experts)
            handles.append(layer.pre_mlp_layernorm.register_forward_hook(out_hook("hidden_mlp", i)))
        else:
            handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(pre_hook("ffn", i)))
            handles.append(norm_hooks(layer.pre_mlp_layernorm, layer.mlp.linear_fc1, "hidden_mlp", i))
        handles.append(layer.self_attention.linear_proj.register_forward_pre_hook(
            pre_hook("heads", i, lambda x: head_norms(x, d))))
        handles.append(norm_hooks(layer.input_layernorm, layer.self_attention.linear_qkv,
                                  "hidden_attn", i))
        handles.append(layer.register_forward_hook(block_hook(i), with_kwargs=True))
    if shard.post_process and getattr(decoder, "final_layernorm", None) is not None:
        handles.append(decoder.final_layernorm.register_forward_hook(out_hook("hidden_final", -1)))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()

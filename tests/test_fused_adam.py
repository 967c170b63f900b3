"""megatron-core's optimizer over PyTorch's Adam runs the fused kernel after use_fused_adam and
updates the weights as the per-tensor loop does, to round-off (fp32, and bf16 weights with fp32
main weights)."""

import pytest
import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.runtime.adam import _inner_optimizers, use_fused_adam
from nemo_minitron.runtime.shard import build_shard, load_state

from tests.helpers import batch, tiny_hf


def trained_weights(arch, hf, dtype, fused, steps=3):
    shard = build_shard(arch, dtype)
    load_state(shard, hf.state_dict().__getitem__)
    ddp = DistributedDataParallel(shard.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True), shard.model)
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-3, weight_decay=0.1, bf16=dtype == "bf16",
        params_dtype=shard.config.params_dtype), [ddp])
    if fused:
        assert use_fused_adam(opt) == 1
        groups = [g for o in _inner_optimizers(opt) for g in o.param_groups]
        assert groups and all(g["fused"] and not g["foreach"] for g in groups)
    b = batch(arch.vocab_size)
    for _ in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(b["tokens"], b["position_ids"], None).float().square().mean().backward()
        ok, _, _ = opt.step()
        assert ok
    return [p.detach().float().clone() for p in shard.model.parameters()]


# fp32: a few ulps after 3 steps; bf16: after one step (later ones see the bf16 weights, which
# may round one bf16 ulp apart) the weights are at most that ulp apart
@pytest.mark.parametrize("dtype, steps, rtol", [("fp32", 3, 1e-6), ("bf16", 1, 2.0 ** -7)])
def test_fused_adam_matches_loop(dtype, steps, rtol, single_rank):
    hf = tiny_hf("gqa")
    arch = arch_from_hf_config(hf.config)
    start = trained_weights(arch, hf, dtype, fused=False, steps=0)
    loop = trained_weights(arch, hf, dtype, fused=False, steps=steps)
    fused = trained_weights(arch, hf, dtype, fused=True, steps=steps)
    moved = max((a - s).abs().max().item() for a, s in zip(loop, start))
    assert moved >= 1e-3  # the steps did update the weights
    for a, b in zip(fused, loop):
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-7)

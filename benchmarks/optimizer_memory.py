"""Optimizer state per data-parallel rank, with and without megatron-core's distributed optimizer.

    torchrun --nproc-per-node=2 benchmarks/optimizer_memory.py [--model PATH] [--dtype fp32|bf16]

Builds the model (default: the embedded SmolLM2-135M) on every rank, takes one Adam step with the
plain optimizer and one with ``use_distributed_optimizer=True``, and prints, per rank, the bytes
held by the optimizer: Adam moments plus fp32 main weights when they are separate copies (bf16
training, or every shard of the distributed optimizer). Also times a checkpoint gather
(:func:`nemo_minitron.distill.optim_state.gather`). CPU and gloo work; on GPUs run it with NCCL.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as tdist


def state_bytes(opt, model_params: set) -> int:
    """Bytes of every tensor the optimizer holds that is not a model parameter (or a view of one)."""
    from nemo_minitron.distill.optim_state import parts

    seen, total = set(), 0
    model_ptrs = {p.untyped_storage().data_ptr() for p in model_params}
    for o in parts(opt):
        inner = o.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                tensors = [p] + [v for v in inner.state.get(p, {}).values() if torch.is_tensor(v)]
                for t in tensors:
                    key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
                    if t.dim() == 0 or key in seen or t.untyped_storage().data_ptr() in model_ptrs:
                        continue
                    seen.add(key)
                    total += t.numel() * t.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from nemo_minitron import demo
    from nemo_minitron.distill.optim_state import gather
    from nemo_minitron.runtime import dist
    from nemo_minitron.runtime.forward import device
    from nemo_minitron.runtime.shard import load_checkpoint

    dist.init(1, 1)
    dp, rank = ps.get_data_parallel_world_size(), tdist.get_rank()
    rows = []
    for sharded in (False, True):
        shard, _ = load_checkpoint(args.model or demo.checkpoint_dir(), args.dtype)
        ddp = DistributedDataParallel(shard.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=sharded), shard.model)
        opt = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=1e-5, bf16=args.dtype == "bf16",
            params_dtype=shard.config.params_dtype, use_distributed_optimizer=sharded), [ddp])
        tokens = torch.randint(0, shard.arch.vocab_size, (1, args.seq), device=device())
        pos = torch.arange(args.seq, device=device()).unsqueeze(0)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        shard.model(tokens, pos, None).float().mean().backward()
        ddp.finish_grad_sync()
        opt.step()
        n = sum(p.numel() for p in shard.model.parameters())
        held = state_bytes(opt, set(shard.model.parameters()))
        t = time.perf_counter()
        if sharded:
            gather(opt, dict(ddp.module.named_parameters()))
        t_gather = time.perf_counter() - t
        rows.append((sharded, n, held, t_gather))
        del opt, ddp, shard
    every = [None] * tdist.get_world_size()
    tdist.all_gather_object(every, rows)
    if rank == 0:
        print(f"{args.dtype}, DP={dp}; optimizer state per rank (bytes outside the model's own "
              "parameters)")
        for r, rr in enumerate(every):
            for sharded, n, held, t_gather in rr:
                name = "distributed" if sharded else "plain      "
                extra = f", checkpoint gather {t_gather:.2f} s" if sharded else ""
                print(f"  rank {r} {name}: {held / 2**20:8.1f} MiB  ({held / n:.2f} bytes per "
                      f"model parameter{extra})")
    dist.release()


if __name__ == "__main__":
    main()

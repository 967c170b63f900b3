"""The distributed optimizer's state in a form that does not depend on the data-parallel size.

megatron-core's distributed optimizer (``train.distributed_optimizer=true``) shards the fp32 main
parameters and Adam moments across data-parallel ranks: each rank owns a contiguous range of the
gradient buffer, and that range cuts through parameters wherever the DP size puts it. A
checkpoint of those shards could only be read back at the same DP size, so :func:`gather`
reassembles, per parameter name, the full fp32 main parameter and both moments on DP rank 0 (one
reduction per parameter, so peak extra memory is one parameter, not the model), and
:func:`scatter` cuts them again along the ranges of whatever DP size the resumed run has. The
non-sharded state (step count, hyper-parameters per group, loss scaler) is the optimizer's own
``state_dict()``, identical on every DP rank.

Under expert parallelism megatron builds two parts: the dense parameters, sharded over the
data-parallel group, and the expert parameters, sharded over the smaller expert-data-parallel
group (the DP ranks that hold the same experts). Each part is gathered over its own group. The
training state is then one file per EP rank (its experts, written by expert-DP rank 0), and every
such file must hold the dense state too, so that a rank resumes from its own file alone: the
dense part is summed onto every DP rank instead of the first.
"""

from __future__ import annotations

import torch

from ..runtime.collectives import all_reduce_sum, reduce_sum_to_first

# megatron-core is imported inside the functions that use it: importing it takes seconds, and this
# module is imported (by the stages, preflight, the tests) long before a model is built.

KEYS = ("param", "exp_avg", "exp_avg_sq")
FORMAT = "model_space/1"


def parts(optimizer) -> list:
    """The optimizers inside ``optimizer`` (megatron chains one per buffer / param group)."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in parts(optimizer))


def _is_expert(o) -> bool:
    """A part of expert-parallel parameters (megatron marks them ``allreduce=False``)."""
    return any(not getattr(p, "allreduce", True) for b in o.buffers for p in b.param_index_map)


def _owned(o) -> dict:
    """model param -> its range (start, end) within the flattened param owned by this DP rank."""
    owned = {}
    for gbuf in o.gbuf_ranges:
        for buckets in gbuf.values():
            for bucket in buckets:
                for p, r in bucket["param_map"].items():
                    owned[p] = (r["param"].start, r["param"].end)
    return owned


def shards(optimizer) -> list[dict]:
    """How this rank's distributed optimizer cuts the state, per part: ``expert`` (expert
    parameters), ``group`` (the ranks sharing the part), ``owned`` (elements this rank keeps)
    and ``total`` (elements of the part); for the log and the tests."""
    return [{"expert": _is_expert(o), "group": o.data_parallel_group.size(),
             "owned": sum(end - start for start, end in _owned(o).values()),
             "total": sum(p.numel() for b in o.buffers for p in b.param_index_map)}
            for o in parts(optimizer)]


def _main_and_moments(o, p) -> dict:
    """This rank's shard of the fp32 main param and the Adam moments of model param ``p``."""
    gi, go = o.model_param_group_index_map[p]
    main = o.optimizer.param_groups[gi]["params"][go]
    state = o.optimizer.state[main]
    return {"param": main, "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}


def _check(o) -> None:
    if getattr(o.config, "use_precision_aware_optimizer", False):
        raise ValueError("checkpoints of the precision-aware distributed optimizer are not "
                         "supported; leave optimizer precision at its fp32 default")
    if o.config.optimizer != "adam":
        raise ValueError(f"distributed-optimizer checkpoints support adam, not {o.config.optimizer}")


def gather(optimizer, named_params: dict[str, torch.nn.Parameter]) -> dict | None:
    """Collective over each optimizer's data-parallel group; the whole state on DP rank 0 (under
    expert parallelism: on expert-DP rank 0, this EP rank's experts and all dense parameters).

    Returns ``{"format", "common": [state_dict per part], "params": {name: {key: tensor}}}`` there
    (tensors on the CPU, fp32, shaped like the parameter) and None elsewhere.
    """
    out = {"format": FORMAT, "common": [], "params": {}}
    roots = []
    ps = parts(optimizer)
    expert_parallel = any(_is_expert(o) for o in ps)
    for o in ps:
        _check(o)
        group = o.data_parallel_group
        # the dense part goes to every EP rank's file: summed onto all its DP ranks
        everywhere = expert_parallel and not _is_expert(o)
        roots.append(everywhere or group.rank() == 0)
        owned = _owned(o)
        out["common"].append(o.state_dict())
        # every rank walks the same parameters in the same order (by name; a rank's own maps
        # hold only the parameters its range touches)
        mine = {p for b in o.buffers for p in b.param_index_map}
        for name, p in named_params.items():
            if p not in mine:
                continue
            full = torch.zeros(len(KEYS), p.numel(), dtype=torch.float32, device=p.device)
            if p in owned:
                start, end = owned[p]
                shard = _main_and_moments(o, p)
                for i, k in enumerate(KEYS):
                    full[i, start:end] = shard[k].detach().float()
            if group.size() > 1:  # ranges are disjoint: the sum assembles the parameter
                (all_reduce_sum if everywhere else reduce_sum_to_first)(full, group)
            if roots[-1]:
                out["params"][name] = {k: full[i].cpu().view(p.shape).clone()
                                       for i, k in enumerate(KEYS)}
    return out if all(roots) else None


def scatter(optimizer, state: dict, named_params: dict[str, torch.nn.Parameter]) -> None:
    """Load a :func:`gather` result into this rank's shards (any DP size)."""
    if state.get("format") != FORMAT:
        raise ValueError(f"optimizer state format {state.get('format')!r} is not {FORMAT!r}")
    names = {p: n for n, p in named_params.items()}
    ps = parts(optimizer)
    if len(state["common"]) != len(ps):
        raise ValueError(f"the checkpoint holds {len(state['common'])} optimizer part(s), this "
                         f"run builds {len(ps)}: were dtype or parameter groups changed?")
    missing = [n for n in named_params if n not in state["params"]]
    if missing:
        raise ValueError(f"the checkpoint's optimizer state lacks {len(missing)} parameter(s), "
                         f"e.g. {missing[0]}: it belongs to a different model")
    for o, common in zip(ps, state["common"]):
        _check(o)
        o.load_state_dict(common)  # allocates this rank's shard tensors
        # megatron hands every parameter the same "step" tensor; torch's Adam increments each
        # parameter's step in place, so a shared one would advance once per parameter
        for st in o.optimizer.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
        for p, (start, end) in _owned(o).items():
            saved = state["params"][names[p]]
            shard = _main_and_moments(o, p)
            with torch.no_grad():
                for k in KEYS:
                    src = saved[k].reshape(-1)[start:end]
                    shard[k].copy_(src.to(shard[k].device, shard[k].dtype))

"""Redirect megatron-core's hard-coded CUDA calls to the CPU.

megatron-core 0.16 assumes a GPU in a handful of places even when every tensor lives on the CPU:
``torch.cuda.current_device()`` (rotary embedding, global memory buffer, p2p shape exchange),
``torch.cuda.synchronize()`` (pipeline p2p), ``torch.zeros/tensor(..., device="cuda")`` (token
counters in ``pipeline_parallel/schedules.py``; found-inf flags, loss scales and norms in the
optimizer, ``clip_grads``, the grad buffers and the local multi-tensor L2 norm), the CUDA-type
assertion in gradient clipping, the default causal mask built with ``device="cuda"`` (unfused
softmax), ``weight.data.cuda()`` when tied embeddings are synchronised across pipeline stages, the
bf16 and distributed optimizers' checks that parameters are ``torch.cuda.*Tensor``, and the CUDA RNG tracker (``get_cuda_rng_tracker().fork()`` in
attention, ``model_parallel_cuda_manual_seed``). This module patches exactly those, and only when
:func:`apply` is called on a process without CUDA (or one told to leave its GPUs alone:
:func:`hide_gpus_from_process`).

Outside ``runtime/``, nothing touches ``torch.cuda`` or megatron-core's ``parallel_state``
(``tests/test_layering.py`` checks it): inside, :mod:`.dist` chooses the device and sets up the
groups, :mod:`.parallel` reads them into the ``Parallel`` context that code above runtime/ is
handed, :mod:`.model` and :mod:`.forward` place models and tensors on the chosen device (and,
with :mod:`.shard` and :mod:`.routing`, read their rank's shard from the groups), and
:mod:`.precision` asks whether the GPU supports bf16.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types

import torch

# megatron-core modules are imported inside the patches that change them, which run only when a
# CPU job starts (importing megatron-core takes seconds).

_APPLIED = False


class CpuRNGStatesTracker:
    """Named CPU generator states with the interface of megatron's ``CudaRNGStatesTracker``."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()
        self._is_initialized = False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"rng seed {seed} already in use")
        if name in self.states_:
            raise ValueError(f"rng state {name!r} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise ValueError(f"rng state {name!r} was never added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _cpu_seed(seed: int, *args, **kwargs):
    """CPU stand-in for ``model_parallel_cuda_manual_seed``: same stream layout, CPU generators."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    tp_rank = ps.get_tensor_model_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank()
    etp_rank = ps.get_expert_tensor_parallel_rank()
    torch.manual_seed(seed)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


class _TorchWithCpuDefaults(types.ModuleType):
    """A view of ``torch`` whose tensor factories map ``device="cuda"`` to the CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _fix(kwargs):
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = "cpu"
        return kwargs

    def zeros(self, *args, **kwargs):
        return torch.zeros(*args, **self._fix(kwargs))

    def tensor(self, *args, **kwargs):
        return torch.tensor(*args, **self._fix(kwargs))


def _clip_grads_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """``clip_grad_by_total_norm_fp32`` without its assertion that grads are CUDA tensors."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff >= 1.0:
        return
    for p in parameters:
        g = getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad
        if g is not None:
            g.detach().mul_(coeff)


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    orig = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = orig


def _patch_tied_embedding_setup() -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    orig = LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(orig)
    def setup_on_cpu(self, *args, **kwargs):
        with _tensor_cuda_is_identity():
            return orig(self, *args, **kwargs)

    LanguageModule.setup_embeddings_and_output_layer = setup_on_cpu


def _cuda_type_name(t, *args, **kwargs):
    """``Tensor.type()`` answering as if the tensor lived on the GPU (``torch.cuda.FloatTensor``)."""
    if args or kwargs:
        return torch.Tensor.type(t, *args, **kwargs)
    return torch.Tensor.type(t).replace("torch.", "torch.cuda.", 1)


def _patch_mixed_precision_optimizers() -> None:
    """The bf16/fp16 optimizer and the distributed optimizer sort parameters into fp32 / fp16 /
    bf16 groups by their CUDA type name and refuse anything else; while one is built, its
    parameters answer with that name."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for cls in (DistributedOptimizer, Float16OptimizerWithFloat16Params):
        orig = cls.__init__

        @functools.wraps(orig)
        def init_on_cpu(self, optimizer, *args, _orig=orig, **kwargs):
            params = [p for g in optimizer.param_groups for p in g["params"]]
            for p in params:
                p.type = functools.partial(_cuda_type_name, p)
            try:
                _orig(self, optimizer, *args, **kwargs)
            finally:
                for p in params:
                    del p.type

        cls.__init__ = init_on_cpu


def hide_gpus_from_process() -> None:
    """Make this process CPU-only although GPUs are present (more ranks than GPUs on a node).

    ``CUDA_VISIBLE_DEVICES`` only works before CUDA is initialised (torch caches the device
    count after that), so ``torch.cuda.is_available``/``device_count`` answer "none" as well:
    megatron-core and our runtime then take their CPU paths (local spec, gloo, CPU tensors).
    """
    if not torch.cuda.is_initialized():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.cuda.is_available = lambda: False
    torch.cuda.device_count = lambda: 0


def apply(hide_gpus: bool = False) -> None:
    """Install the redirections. Idempotent; where CUDA is available it refuses, unless
    ``hide_gpus`` asks to hide the GPUs from this process first."""
    global _APPLIED
    if _APPLIED:
        return
    if torch.cuda.is_available():
        if not hide_gpus:
            raise RuntimeError("cpu_compat.apply() is for CPU-only processes; CUDA is available "
                               "here (pass hide_gpus=True to run this process on the CPU anyway)")
        hide_gpus_from_process()

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None

    from megatron.core import utils as mutils
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.optimizer import clip_grads, grad_scaler
    from megatron.core.optimizer import optimizer as moptimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom

    # modules that create small bookkeeping tensors with a literal device="cuda"
    for mod in (schedules, moptimizer, clip_grads, grad_scaler, param_and_grad_buffer, mutils):
        mod.torch = _TorchWithCpuDefaults()
    _patch_tied_embedding_setup()
    _patch_mixed_precision_optimizers()
    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grads_cpu
    moptimizer.clip_grad_by_total_norm_fp32 = _clip_grads_cpu
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    causal = functools.lru_cache(maxsize=8)(
        lambda sq: torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1))
    tutils.get_default_causal_mask = causal
    fused_softmax.get_default_causal_mask = causal
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom.initialize_rng_tracker = lambda *a, **k: None
    mrandom.model_parallel_cuda_manual_seed = _cpu_seed
    import megatron.core.tensor_parallel as tp_pkg

    tp_pkg.model_parallel_cuda_manual_seed = _cpu_seed
    _APPLIED = True

"""Intermediate hidden-state and embedding losses during distillation, under any TP/PP/DP layout.

Minitron (arXiv 2407.14679 §3-4, 2408.11796): when depth shrinks a lot, logit KD is helped by
losses between the student's and the teacher's hidden states at chosen layer pairs (and between
the embedding outputs), weighted dynamically by ``alpha = L_logits / L_intermediate``.

How the pieces fit
------------------
* **Capture.** Forward hooks on the megatron ``TransformerLayer`` modules of the pairs (their
  output, ``[seq, batch, hidden]``, before the final norm for the last layer) and on the
  embedding (the input of layer 0) of both models. They record only while :class:`DistillPair`
  runs its forward (not during validation or activation recomputation).
* **Loss on the stage of the pair's later layer.** Right after the forward of a micro-batch,
  each stage computes ``sum_pairs w * hidden_state_loss(...)`` of the pairs whose loss lives
  there (a token *sum*, like every loss here), with a learned projection per pair when the
  hidden sizes differ; the embedding is on the first stage of both models. A pair with both
  layers on one stage is computed there. A pair whose layers sit on different stages (any PP
  size, either direction) is computed on the later stage: the earlier stage's state reaches it
  as extra channels of the tensor the pair sends between stages (:mod:`.carry`: one slot per
  such pair; a carried student state is already projected and keeps its autograd graph through
  the p2p backward, a carried teacher state is detached), so the values and gradients are those
  of a single-stage run.
* **Gradient.** The last stage adds that sum to the schedule's loss (``Objective.loss_func``), so it
  gets megatron's normalisation for free. Other stages have no loss function: their sum is
  attached to the tensor the stage sends on with :class:`_AddLossGrad`, an identity whose
  backward also backpropagates the sum with the factor megatron applies to the last stage's loss
  (``grad_scale / max(tokens, 1) / num_microbatches``; ``grad_scale`` alone under
  ``calculate_per_token_loss``), the same trick as megatron's ``MoEAuxLossAutoScaler``. So every
  stage's intermediate terms end in the gradient exactly as if the last stage had computed them.
* **Projections** are student-side parameters of the stage holding the pair's student layer
  (a carried student state is projected before it leaves): they live next to the student inside
  the module that DDP wraps (:class:`StudentWithProjections`), so they are in the optimizer and
  in DDP's gradient reduction; they are replicated over TP ranks (the hidden states are, without
  sequence parallelism), seeded identically everywhere, saved in the training state for an exact
  resume and never exported with the student.
* **Reports.** Each rank keeps the unweighted token sums of its stage (``hidden``: all pairs
  together, ``emb``); the training loop sums them over every stage and data-parallel replica
  (TP rank 0 only) and divides by the last stage's token count, so ``hidden`` is the sum over
  pairs of their token-mean losses, identical on every rank.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass, field

import torch

from .carry import plan_slots
from .layer_map import plan_of
from .losses import dynamic_weight, hidden_state_loss, make_projection, project


@dataclass
class IntermediateSpec:
    """The intermediate-loss part of ``kd`` (see KDConfig)."""

    pairs: list[tuple[int, int]] = field(default_factory=list)
    kind: str = "cosine"
    hidden_weight: float = 1.0
    embedding_weight: float = 0.0
    dynamic: bool = True

    @property
    def enabled(self) -> bool:
        return bool(self.pairs) or self.embedding_weight > 0

    @classmethod
    def from_kd(cls, kd) -> "IntermediateSpec":
        return cls(pairs=[(int(s), int(t)) for s, t in kd.hidden_pairs], kind=kd.hidden_kind,
                   hidden_weight=float(kd.hidden_weight),
                   embedding_weight=float(kd.embedding_weight), dynamic=bool(kd.hidden_dynamic))

    def alpha(self, kd_mean: float, hidden_mean: float | None, emb_mean: float | None) -> float:
        """Dynamic ``alpha = L_logits / L_intermediate`` from globally reduced token means, with
        ``L_intermediate = hidden_weight * hidden + embedding_weight * emb`` (the weighted
        intermediate terms alpha multiplies)."""
        inter = self.hidden_weight * (hidden_mean or 0.0) + self.embedding_weight * (emb_mean or 0.0)
        return float(dynamic_weight(kd_mean, inter))


def check_pairs(pairs, student_layers: int, teacher_layers: int) -> None:
    """Layer numbers in range for each model. Any pipeline layout works: a pair split over two
    stages is carried (:mod:`.carry`)."""
    for i, (s, t) in enumerate(pairs):
        where = f"kd.hidden_pairs[{i}]=[{s}, {t}]"
        for name, layer, n in (("student", s, student_layers), ("teacher", t, teacher_layers)):
            if not 0 <= layer < n:
                raise ValueError(f"{where}: the {name} has {n} layers (0..{n - 1}), there is no "
                                 f"{name} layer {layer}; pairs are [student_layer, teacher_layer]")


def pruned_keep_index(student_dir, teacher_dir, h_s: int, h_t: int):
    """The teacher channels a pruned student kept (plan.json of `minitron prune`), when the
    student was pruned from this very teacher; None otherwise. Initialises the projections so the
    student's channels start in their teacher positions."""
    d = plan_of(student_dir, teacher_dir)
    keep = (d or {}).get("keep", {}).get("hidden")
    if keep is None or len(keep) != h_s or d.get("source", {}).get("hidden_size") != h_t:
        return None
    return torch.tensor(keep, dtype=torch.long)


def projection_key(student_layer: int | None, teacher_layer: int | None = None) -> str:
    return "embedding" if student_layer is None else f"layer{student_layer}_to_{teacher_layer}"


def make_projections(spec: IntermediateSpec, student_shard, h_s: int, h_t: int, *, seed: int,
                     keep_index=None) -> torch.nn.ModuleDict:
    """This stage's projections (one per pair whose student layer is here, one for the embedding
    on the first stage), only when the hidden sizes differ; identical on every rank that builds
    the same key, whatever the pipeline layout."""
    proj = torch.nn.ModuleDict()
    if h_s == h_t:
        return proj
    keys = [projection_key(s, t) for s, t in spec.pairs if s in student_shard.layers]
    if spec.embedding_weight > 0 and student_shard.pre_process:
        keys.append(projection_key(None))
    p = next(student_shard.model.parameters())
    for key in keys:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + zlib.crc32(key.encode()))
            proj[key] = make_projection(h_s, h_t, keep_index=keep_index, dtype=p.dtype,
                                        device=p.device)
    return proj


class StudentWithProjections(torch.nn.Module):
    """What DDP wraps: the student stage plus the learned projections of the intermediate losses.

    ``module`` is the student itself, so megatron's ``get_attr_wrapped_model`` and checkpoint
    saving (which use the student stage, not this wrapper) see the model unchanged."""

    def __init__(self, module: torch.nn.Module, projections: torch.nn.ModuleDict):
        super().__init__()
        self.module = module
        self.projections = projections

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class _AddLossGrad(torch.autograd.Function):
    """Identity on ``x``; its backward also starts the backward of ``loss`` with gradient ``scale``."""

    @staticmethod
    def forward(ctx, x, loss, scale):
        ctx.save_for_backward(scale)
        ctx.loss_shape = loss.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad, scale.reshape(()).expand(ctx.loss_shape), None


def loss_scale(config, num_tokens: torch.Tensor, num_microbatches: int) -> torch.Tensor:
    """The factor megatron's schedule applies to the last stage's loss sum of one micro-batch."""
    one = torch.ones(1, dtype=torch.float32, device=num_tokens.device)
    scale = config.grad_scale_func(one) if config.grad_scale_func is not None else one
    if not config.calculate_per_token_loss:
        scale = scale / torch.clamp(num_tokens.float(), min=1) / num_microbatches
    return scale.detach()


class IntermediateLosses:
    """Hooks, losses and carried states (:mod:`.carry`) of one pipeline stage of a (student,
    teacher) pair."""

    def __init__(self, spec: IntermediateSpec, student_shard, teacher_shard,
                 projections: torch.nn.ModuleDict):
        self.spec = spec
        self.proj = projections
        # (report, student source, teacher source, projection key or None); a source is a hooked
        # output ("s"/"t", layer) or a received slot ("in", slot index)
        self.terms: list[tuple[str, tuple, tuple, str | None]] = []
        self._got: dict[tuple, torch.Tensor] = {}
        self._received: dict[int, torch.Tensor] = {}
        self._active = False
        self._handles = []
        self._hooked: set[tuple] = set()
        self.weights = {"hidden": 0.0, "emb": 0.0}
        self.num_microbatches = 1
        self.sums: dict[str, torch.Tensor] = {}
        s_layers, t_layers = list(student_shard.layers), list(teacher_shard.layers)
        pp = student_shard.arch.num_layers // len(s_layers)
        self.stage, self.last = s_layers[0] // len(s_layers), student_shard.post_process
        self.ht = teacher_shard.arch.hidden_size
        self.slots = plan_slots(spec.pairs, student_shard.arch.num_layers,
                                teacher_shard.arch.num_layers, pp)
        self.carry_width = self.ht * len(self.slots)  # extra channels of the p2p tensor

        def hook_s(s):
            self._hook(student_shard.model.decoder.layers[s_layers.index(s)], ("s", s))

        def hook_t(t):
            self._hook(teacher_shard.model.decoder.layers[t_layers.index(t)], ("t", t))

        slot_of = {slot.pair: i for i, slot in enumerate(self.slots)}
        for s, t in spec.pairs:
            i = slot_of.get((s, t))
            if i is None:  # both layers on one stage
                if s in s_layers:
                    hook_s(s)
                    hook_t(t)
                    self.terms.append(("hidden", ("s", s), ("t", t), projection_key(s, t)))
                continue
            role, side = self.slots[i].role(self.stage), self.slots[i].side
            if role == "send" and side == "s":
                hook_s(s)
            elif role == "send":
                hook_t(t)
            elif role == "use" and side == "s":  # projected student state arrives
                hook_t(t)
                self.terms.append(("hidden", ("in", i), ("t", t), None))
            elif role == "use":  # teacher state arrives
                hook_s(s)
                self.terms.append(("hidden", ("s", s), ("in", i), projection_key(s, t)))
        if spec.embedding_weight > 0 and student_shard.pre_process:
            self._hook(student_shard.model.embedding, ("s", "emb"))
            self._hook(teacher_shard.model.embedding, ("t", "emb"))
            self.terms.append(("emb", ("s", "emb"), ("t", "emb"), projection_key(None)))

    def _hook(self, module, key) -> None:
        if key in self._hooked:  # a layer in several pairs
            return
        self._hooked.add(key)

        def hook(_module, _inputs, out):
            if self._active:
                self._got[key] = out[0] if isinstance(out, (tuple, list)) else out

        self._handles.append(module.register_forward_hook(hook))

    def set_step(self, alpha: float, num_microbatches: int) -> None:
        """Weights of this step's terms (``alpha`` times the configured ones) and micro-batches."""
        self.weights = {"hidden": alpha * self.spec.hidden_weight,
                        "emb": alpha * self.spec.embedding_weight}
        self.num_microbatches = num_microbatches

    def take_sums(self) -> dict[str, float]:
        """Unweighted token sums since the last call (this stage, all micro-batches)."""
        out, self.sums = self.sums, {}
        return {k: v.item() for k, v in out.items()}

    @contextlib.contextmanager
    def capturing(self):
        self._got, self._active = {}, True
        try:
            yield
        finally:
            self._active = False

    def local_loss(self, loss_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Weighted sum of this stage's terms for the micro-batch just captured (None when no term
        lives here or every weight is 0); records the unweighted sums for the reports."""
        got = {**self._got, **{("in", i): v for i, v in self._received.items()}}
        mask = loss_mask.t() if loss_mask is not None else None  # hidden states are [s, b, h]
        total = None
        for report, s_key, t_key, pkey in self.terms:
            w = self.weights[report]
            with contextlib.nullcontext() if w else torch.no_grad():
                val, _ = hidden_state_loss(got[s_key], got[t_key], kind=self.spec.kind,
                                           projection=self._projection(pkey), mask=mask)
            acc = self.sums.get(report)
            v = val.detach().double()
            self.sums[report] = v if acc is None else acc + v
            if w:
                total = val * w if total is None else total + val * w
        return total

    def _projection(self, key: str | None):
        return self.proj[key] if key is not None and key in self.proj else None

    def receive(self, carry: torch.Tensor | None) -> None:
        """The slot channels of the tensor this stage received (None on the first stage)."""
        if carry is None:
            self._received = {}
            return
        parts = carry.split(self.ht, dim=-1)
        self._received = {i: p.detach() if slot.side == "t" else p
                          for i, (slot, p) in enumerate(zip(self.slots, parts))}

    def carry_out(self, like: torch.Tensor) -> torch.Tensor | None:
        """The slot channels this stage sends on (None on the last stage or without slots), in
        ``like``'s dtype; forgets the micro-batch's captured and received states."""
        got, received = self._got, self._received
        self._got, self._received = {}, {}
        if not self.slots or self.last:
            return None
        parts = []
        for i, slot in enumerate(self.slots):
            role = slot.role(self.stage)
            s, t = slot.pair
            if role == "send" and slot.side == "t":
                parts.append(got[("t", t)].detach())
            elif role == "send":  # projected here, so the loss stage needs no projection
                with contextlib.nullcontext() if self.weights["hidden"] else torch.no_grad():
                    parts.append(project(got[("s", s)], self._projection(projection_key(s, t))))
            elif role == "pass":
                parts.append(received[i])
            else:
                parts.append(like.new_zeros(like.shape[:-1] + (self.ht,)))
        return torch.cat([p.to(like.dtype) for p in parts], dim=-1)

    def attach(self, output: torch.Tensor, loss: torch.Tensor, config,
               loss_mask: torch.Tensor) -> torch.Tensor:
        """``output`` (the student's output of this non-last stage), carrying ``loss``'s gradient."""
        scale = loss_scale(config, loss_mask.sum(), self.num_microbatches)
        return _AddLossGrad.apply(output, loss, scale)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

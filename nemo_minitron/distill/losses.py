"""Distillation losses as pure functions (tensors in, tensors out), vocab-parallel where it matters.

Minitron (arXiv 2407.14679 §3-4, 2408.11796 §3): the student learns from the teacher's logits
(forward KL, the paper's choice) optionally with an LM loss and intermediate hidden-state losses
whose weight is set dynamically.

Conventions shared by every loss here
-------------------------------------
* Logits are ``[..., V_local]``. Under tensor parallelism rank ``r`` of ``tp_group`` holds the
  contiguous global vocabulary ids ``[r * V_local, (r + 1) * V_local)`` (megatron's
  ``VocabParallelEmbedding`` / ``ColumnParallelLinear`` layout). ``tp_group=None`` (or a group of
  one) means the full vocabulary is local. The full vocabulary is never gathered: only per-token
  maxima / sums (and, for top-k, ``k`` candidates per token) cross ranks.
* ``vocab_size`` is the true vocabulary size; columns whose global id is ``>= vocab_size``
  (padding rows of the output layer) are masked to ``-inf`` for student and teacher alike.
* The math runs in fp32 whatever the input dtype; the gradient has the dtype of the input.
* ``mask`` is ``[...]`` (the logits' leading shape): a per-token weight, 0 for padding or positions
  that must not be learned (document boundaries). ``None``: every token weighs 1.
* Every loss returns ``(loss_sum, count)``: fp32 0-d tensors, ``loss_sum = sum_i mask_i * loss_i``
  and ``count = sum_i mask_i``. Both are identical on all ranks of ``tp_group``. To average, sum
  both over micro-batches and data-parallel ranks (not over TP ranks) and divide; that gives the
  exact token mean however the tokens were split.
* The teacher is always treated as a constant (no gradient reaches it).

Gradients and memory
--------------------
The logit losses are custom autograd functions with analytic gradients, computed chunk by chunk
in the forward (the way megatron's ``vocab_parallel_cross_entropy`` and Liger's fused linear
cross-entropy work): each chunk of ``chunk_tokens`` tokens is upcast to fp32 into a few
chunk-sized buffers that are updated in place, its loss and its gradient w.r.t. the student logits
are computed, and the gradient is written into one preallocated buffer of the input's shape and
dtype; the backward only scales that buffer by the upstream gradient. So the fp32 softmax of all
tokens never exists at once, nothing is recomputed, no autograd graph is built over ``[N, V]``
tensors, and neither the student nor the teacher logits are kept alive for the backward. (Per-chunk
``torch.utils.checkpoint`` would bound the fp32 intermediates too, but it runs every forward
twice, keeps both logit tensors alive until the backward, and ``SplitBackward`` concatenates the
chunk gradients into a second logits-sized buffer.) The price: the gradient is computed whenever
the student logits require grad under grad mode, and the graph can be backpropagated only once.
:func:`fused_output_kl` goes further and folds the output-layer matmul into the chunks, so the full
student and teacher logits never exist at all.

Under tensor parallelism the loss is ``L = sum_r l_r``, ``l_r`` summing the terms of rank r's
vocabulary columns; every rank gets ``L`` (one all-reduce) and computes the exact ``dL/dz_r`` of
its shard, using only per-token all-reduces (max, sum of exponentials, and for reverse KL / JSD
one inner product ``<p_S, a>``). Backward on every TP rank with the same upstream gradient (what
megatron does, the loss being replicated) yields each rank's shard of the TP=1 gradient.
(A differentiable all-reduce whose backward is the identity would be wrong for the normaliser:
every rank's partial ``l_r`` depends on the global log-sum-exp, so its gradient must be summed
over ranks; the identity backward drops the other ranks' share.)
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, Optional

import torch

from ..runtime.collectives import all_gather_cat, all_reduce_max, all_reduce_sum, size_rank

KINDS = ("forward", "reverse", "jsd")


# --------------------------------------------------------------------------- process-group helpers

def _tp(group) -> tuple[int, int]:
    """(size, rank) of the TP group; (1, 0) when there is none."""
    return size_rank(group)


def _all_reduce_(x: torch.Tensor, group, maximum: bool = False) -> torch.Tensor:
    """In-place sum (or maximum) all-reduce (no autograd); a no-op without a group of more than
    one rank."""
    if _tp(group)[0] > 1:
        (all_reduce_max if maximum else all_reduce_sum)(x, group)
    return x


def _column_ids(v_local: int, group, device) -> torch.Tensor:
    """Global vocabulary ids of this rank's columns."""
    _, rank = _tp(group)
    return torch.arange(rank * v_local, (rank + 1) * v_local, device=device)


def _valid_columns(v_local: int, vocab_size: Optional[int], group, device) -> Optional[torch.Tensor]:
    """Bool [V_local] of real (non-padding) columns, or None when all of this shard is real."""
    if vocab_size is None or (_tp(group)[1] + 1) * v_local <= vocab_size:
        return None
    return _column_ids(v_local, group, device) < vocab_size


# --------------------------------------------------------------------------- per-chunk kernels
# Each kernel takes one chunk of logits [c, V_local], works on fp32 copies in place (a handful of
# chunk-sized buffers, no autograd graph) and returns this rank's partial loss sum and, when asked,
# the exact gradient of the *global* loss sum w.r.t. its logit chunk (fp32 [c, V_local]).

def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row ``sum_v a * b`` of two [c, V] tensors without a [c, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _log_softmax_(xs: list[torch.Tensor], keep: Optional[torch.Tensor], group) -> torch.Tensor:
    """In place: each fp32 [c, V_local] tensor becomes its vocab-parallel log-softmax (-inf where
    ``keep`` is False). The per-token max is all-reduced (MAX), then the sum of exponentials (SUM):
    two [len(xs), c] all-reduces. Returns a spare [c, V_local] buffer for the caller to reuse."""
    if keep is not None:
        for x in xs:
            x.masked_fill_(~keep, float("-inf"))
    m = torch.stack([x.amax(dim=-1) for x in xs])
    _all_reduce_(m, group, maximum=True)
    tmp = torch.empty_like(xs[0])
    se = []
    for x, mx in zip(xs, m):
        torch.sub(x, mx.unsqueeze(-1), out=tmp)
        se.append(tmp.exp_().sum(dim=-1))
    se = _all_reduce_(torch.stack(se), group)
    lse = m + se.log()
    for x, l in zip(xs, lse):
        x.sub_(l.unsqueeze(-1))
    return tmp


def _one_rank(keep: Optional[torch.Tensor], group) -> bool:
    """Whether a chunk's log-softmax needs neither masking nor cross-rank reductions."""
    return keep is None and _tp(group)[0] == 1


def _fused_log_softmax(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """A new fp32 ``log_softmax(z / T)`` of a [c, V] chunk through PyTorch's fused kernel, for
    :func:`_one_rank` chunks. On a CPU a forward-KL chunk (loss and gradient) runs a fifth to a
    quarter faster this way than with :func:`_log_softmax_`'s separate max, subtract, exp, sum
    and subtract passes."""
    if temperature != 1.0:
        z = z.to(torch.float32).div(temperature)
    return torch.log_softmax(z, -1, dtype=torch.float32)


def _global_topk(y: torch.Tensor, valid: Optional[torch.Tensor], k: int, group):
    """``(values, global ids)`` ``[c, k]`` of the k largest entries per row over every TP shard
    (descending). Each rank takes its local top-min(k, V_local) (padding columns at -inf), the
    ``k`` candidates per rank (values and global ids) are all-gathered and the top-k of the
    ``k * tp`` candidates taken: nothing vocabulary-sized crosses ranks."""
    size, rank = _tp(group)
    v_local = y.shape[-1]
    yy = y if valid is None else y.masked_fill(~valid, float("-inf"))
    vals, idx = yy.topk(min(k, v_local), dim=-1)
    del yy
    gid = idx + rank * v_local
    if size > 1:
        vals, gid = all_gather_cat(vals, group, dim=-1), all_gather_cat(gid, group, dim=-1)
        vals, sel = vals.topk(min(k, vals.shape[-1]), dim=-1)
        gid = gid.gather(-1, sel)
    return vals, gid


def _owned(gid: torch.Tensor, v_local: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """``(local column, mine)`` of global ids ``[c, k]``: ``mine`` marks the ids in this rank's
    vocabulary shard; the others point at column 0 (callers mask them with ``mine``)."""
    local = gid - _tp(group)[1] * v_local
    mine = (local >= 0) & (local < v_local)
    return torch.where(mine, local, torch.zeros_like(local)), mine


def _owned_mask(gid: torch.Tensor, v_local: int, group) -> torch.Tensor:
    """Bool ``[c, V_local]``: this shard's columns among the global ids ``gid [c, k]``."""
    local, mine = _owned(gid, v_local, group)
    rows, pos = mine.nonzero(as_tuple=True)
    keep = torch.zeros(gid.shape[0], v_local, dtype=torch.bool, device=gid.device)
    keep[rows, local[rows, pos]] = True
    return keep


def _logsumexp_over_shards(x: torch.Tensor, group) -> torch.Tensor:
    """``log sum_r exp(x_r)`` of per-row values ``x [c]`` that each TP rank holds for its shard
    (a MAX and a SUM all-reduce of ``[c]``); ``-inf`` rows on every rank stay ``-inf``."""
    if _tp(group)[0] == 1:
        return x
    m = _all_reduce_(x.clone(), group, maximum=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m + _all_reduce_((x - m).exp(), group).log()


def _topk_keep(t: torch.Tensor, valid: Optional[torch.Tensor], k: int, group) -> torch.Tensor:
    """Bool ``[c, V_local]``: this shard's columns among the teacher's global top-k per token
    (:func:`_global_topk`; each rank marks the winners that fall in its shard)."""
    _, gid = _global_topk(t, valid, k, group)
    keep = _owned_mask(gid, t.shape[-1], group)
    return keep if valid is None else keep & valid


def _fp32(x: torch.Tensor, owned: bool) -> torch.Tensor:
    """An fp32 tensor we may overwrite: ``x`` itself when owned and already fp32, else a copy."""
    return x.to(torch.float32, copy=not owned)


def _kl_chunk(s: torch.Tensor, t: torch.Tensor, w: torch.Tensor, *, temperature: float, kind: str,
              beta: float, top_k: Optional[int], valid: Optional[torch.Tensor], group,
              want_grad: bool, owned: bool = False):
    """Partial ``T^2 sum_i w_i sum_{v in shard} term_i(v)`` of one chunk and ``d loss / d s``.

    With ``x = s / T``, ``p = softmax(x)``, the gradient of ``T^2 D`` w.r.t. ``s`` is ``T dD/dx``:
    forward KL: ``dD/dx = p_S - p_T``; reverse KL and JSD: ``dD/dx = p_S (a - <p_S, a>)`` with
    ``a = log p_S - log p_T`` (reverse) or ``a = (1 - beta)(log p_S - log M)`` (JSD), the inner
    product taken over the whole vocabulary (one more [c] all-reduce).
    """
    keep = valid
    if top_k is None and _one_rank(valid, group):
        x, y = _fused_log_softmax(s, temperature), _fused_log_softmax(t, temperature)
        tmp = torch.empty_like(x)
    else:
        x = _fp32(s, owned)
        y = _fp32(t, owned)
        if temperature != 1.0:
            x.div_(temperature)
            y.div_(temperature)
        if top_k is not None:
            keep = _topk_keep(y, valid, top_k, group)
        tmp = _log_softmax_([y, x], keep, group)  # y = log p_T, x = log p_S (-inf where masked)
    scale = (w * temperature).unsqueeze(-1)
    grad = None
    if kind == "forward":
        p_t = torch.exp(y, out=tmp)
        d = y.sub_(x)  # log p_T - log p_S
        if keep is not None:
            d.masked_fill_(~keep, 0.0)  # -inf - -inf there; p_T is 0
        tok = _rowdot(p_t, d)
        if want_grad:
            grad = torch.exp(x, out=d).sub_(p_t).mul_(scale)
    elif kind == "reverse":
        p_s = torch.exp(x, out=tmp)
        a = x.sub_(y)  # log p_S - log p_T
        del y
        if keep is not None:
            a.masked_fill_(~keep, 0.0)
        tok = _rowdot(p_s, a)
        if want_grad:
            kl = _all_reduce_(tok.clone(), group)
            grad = a.sub_(kl.unsqueeze(-1)).mul_(p_s).mul_(scale)
    else:  # jsd
        p_s = torch.exp(x, out=tmp)
        p_t = torch.exp(y)
        log_b = math.log(beta) if beta > 0 else float("-inf")
        log_1b = math.log1p(-beta) if beta < 1 else float("-inf")
        lm = torch.add(y, log_b)
        other = torch.add(x, log_1b)
        torch.logaddexp(lm, other, out=lm)  # log M = log(beta p_T + (1 - beta) p_S)
        del other
        y.sub_(lm)
        x.sub_(lm)
        del lm
        if keep is not None:
            y.masked_fill_(~keep, 0.0)
            x.masked_fill_(~keep, 0.0)
        tok = beta * _rowdot(p_t, y) + (1.0 - beta) * _rowdot(p_s, x)
        del p_t, y
        if want_grad:
            inner = _all_reduce_(_rowdot(p_s, x), group)
            grad = x.sub_(inner.unsqueeze(-1)).mul_(p_s).mul_(scale * (1.0 - beta))
    return (tok * w).sum() * (temperature * temperature), grad


def _ce_chunk(z: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, *,
              valid: Optional[torch.Tensor], group, want_grad: bool, owned: bool = False):
    """Partial cross entropy of one chunk (the tokens whose label lies in this shard) and its
    gradient ``w (softmax(z) - onehot(label))``."""
    if _one_rank(valid, group):
        x = _fused_log_softmax(z)
    else:
        x = _fp32(z, owned)
        _log_softmax_([x], valid, group)  # x = log p
    del z
    _, rank = _tp(group)
    v_local = x.shape[-1]
    local = labels - rank * v_local
    inside = (local >= 0) & (local < v_local)
    local = local.clamp(0, v_local - 1)
    lp = x.gather(-1, local.unsqueeze(-1)).squeeze(-1)
    tok = torch.where(inside, -lp, 0.0)
    grad = None
    if want_grad:
        grad = x.exp_()
        rows = inside.nonzero().squeeze(-1)
        grad.index_put_((rows, local[rows]), torch.full_like(rows, -1, dtype=grad.dtype),
                        accumulate=True)
        grad.mul_(w.unsqueeze(-1))
    return (tok * w).sum(), grad


# --------------------------------------------------------------------------- chunked drivers

def _chunks(n: int, chunk: Optional[int]):
    if n == 0:
        return
    step = n if not chunk or chunk <= 0 or chunk >= n else int(chunk)
    for i in range(0, n, step):
        yield i, min(i + step, n)


class _ChunkedLoss(torch.autograd.Function):
    """``sum over chunks of fn(x[chunk], *others[chunk])``, all-reduced over ``group``.

    The gradient w.r.t. ``x`` is computed chunk by chunk in the forward and kept in one buffer of
    ``x``'s shape and dtype; ``others`` (teacher logits, labels, weights) get none.
    """

    @staticmethod
    def forward(ctx, fn, chunk, group, x, *others):
        need = ctx.needs_input_grad[3]
        grad = torch.empty_like(x) if need else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for i, j in _chunks(x.shape[0], chunk):
            val, g = fn(x[i:j], *(o[i:j] for o in others), want_grad=need)
            if need:
                grad[i:j].copy_(g)
            del g
            total += val
        _all_reduce_(total, group)
        ctx.grad = grad
        return total

    @staticmethod
    def backward(ctx, g):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("distillation loss: backward called twice through the same graph "
                               "(its gradient buffer is scaled in place and released)")
        ctx.grad = None
        return (None, None, None, grad.mul_(g.to(grad.dtype))) + (None,) * (len(ctx.needs_input_grad) - 4)


_GRAD_W_BYTES = 1 << 28
"""Lower-precision output weights: the chunks' logit gradients are gathered, up to this many bytes,
into one weight-gradient matmul (a chunk's [V, c] @ [c, h] product alone is memory-bound)."""


class _WeightGrad:
    """``grad_W = sum over chunks of g_z.T @ h`` of the fused output layer.

    fp32 (or wider) weights: one ``addmm_`` per chunk into the gradient. Lower precision: the
    chunks' ``g_z`` are copied into a buffer in the weight's dtype, up to :data:`_GRAD_W_BYTES`,
    and each full buffer is one matmul in that dtype (fp32 accumulation inside the kernel, as the
    output layer's own backward does); the products of several buffers are summed in fp32.
    """

    def __init__(self, weight: torch.Tensor, hidden: torch.Tensor, chunk_rows: int):
        self.dtype, self.h = weight.dtype, hidden
        self.acc = torch.promote_types(weight.dtype, torch.float32)
        self.low = self.acc != weight.dtype
        self.sum = None
        if self.low:
            v = weight.shape[0]
            rows = min(hidden.shape[0], max(chunk_rows, _GRAD_W_BYTES // (v * weight.element_size())))
            self.buf = torch.empty(rows, v, dtype=weight.dtype, device=weight.device)
            self.start = self.fill = 0
        else:
            self.sum = torch.zeros(weight.shape, dtype=self.acc, device=weight.device)

    def add(self, i: int, j: int, gz: torch.Tensor) -> None:
        """The chunk of tokens [i, j) (chunks come in order) with its logit gradient ``gz``."""
        if not self.low:
            self.sum.addmm_(gz.t().to(self.acc), self.h[i:j].to(self.acc))
            return
        if self.fill + (j - i) > self.buf.shape[0]:
            self._flush()
        self.buf[self.fill:self.fill + j - i].copy_(gz)
        self.fill += j - i

    def _flush(self) -> None:
        if not self.fill:
            return
        part = self.buf[:self.fill].t() @ self.h[self.start:self.start + self.fill]
        if self.sum is None:  # one buffer's product is the gradient as it is
            self.sum = part
        else:  # from the second on, summed in fp32
            self.sum = self.sum.to(self.acc).add_(part)
        self.start += self.fill
        self.fill = 0

    def result(self) -> torch.Tensor:
        if self.low:
            self._flush()
            self.buf = None
        return self.sum.to(self.dtype)


class _FusedOutputLoss(torch.autograd.Function):
    """Chunked ``fn(h_s[chunk] @ W_s.T, h_t[chunk] @ W_t.T, w[chunk])``; gradients for h_s and W_s
    accumulated chunk by chunk (``grad_W += g_z.T @ h``, see :class:`_WeightGrad`), the h_s one
    all-reduced over ``group``
    (h_s is replicated over TP ranks, as the input of megatron's ColumnParallelLinear is)."""

    @staticmethod
    def forward(ctx, fn, chunk, group, h_s, w_s, h_t, w_t, w):
        need_h, need_w = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        need = need_h or need_w
        grad_h = torch.empty_like(h_s) if need_h else None
        grad_w = _WeightGrad(w_s, h_s, chunk or h_s.shape[0]) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        for i, j in _chunks(h_s.shape[0], chunk):
            zt = h_t[i:j] @ w_t.t()
            zs = h_s[i:j] @ w_s.t()
            val, gz = fn(zs, zt, w[i:j], want_grad=need, owned=True)
            del zs, zt
            if need_h:
                grad_h[i:j].copy_(gz.to(w_s.dtype) @ w_s)
            if need_w:
                grad_w.add(i, j, gz)
            del gz
            total += val
        _all_reduce_(total, group)
        if need_h:
            _all_reduce_(grad_h, group)
        ctx.grads = (grad_h, grad_w.result() if need_w else None)
        return total

    @staticmethod
    def backward(ctx, g):
        if ctx.grads is None:
            raise RuntimeError("fused_output_kl: backward called twice through the same graph")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if grad_h is not None:
            grad_h = grad_h.mul_(g.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(g.to(grad_w.dtype))
        return None, None, None, grad_h, grad_w, None, None, None


# --------------------------------------------------------------------------- public API

def _check_kl_args(temperature: float, kind: str, beta: float, top_k: Optional[int]) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: use one of {', '.join(KINDS)}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must lie in [0, 1]")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None for the full vocabulary)")


def _token_weights(mask, lead_shape, n, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(n, dtype=torch.float32, device=device)
    if tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the logits' leading "
                         f"shape {tuple(lead_shape)}")
    return mask.reshape(n).to(device=device, dtype=torch.float32)


def _grad_or_const(x: torch.Tensor) -> torch.Tensor:
    """``x`` detached when grad mode is off: the chunked functions compute their gradient in the
    forward whenever the input requires grad (``needs_input_grad`` ignores ``torch.no_grad``)."""
    return x if torch.is_grad_enabled() else x.detach()


def _match_widths(s: torch.Tensor, t: torch.Tensor, vocab_size, group):
    if s.shape[-1] == t.shape[-1]:
        return s, t
    if _tp(group)[0] == 1 and vocab_size is not None and min(s.shape[-1], t.shape[-1]) >= vocab_size:
        return s[..., :vocab_size], t[..., :vocab_size]
    raise ValueError(
        f"student and teacher logits have different widths ({s.shape[-1]} vs {t.shape[-1]} columns "
        "per rank): their vocabularies are padded differently. At TP=1 pass vocab_size (the true "
        "vocabulary) so the padding can be dropped; under tensor parallelism pad both models to the "
        "same size so that each rank holds the same vocabulary ids")


def logits_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
              temperature: float = 1.0, mask: Optional[torch.Tensor] = None, tp_group=None,
              vocab_size: Optional[int] = None, top_k: Optional[int] = None,
              kind: str = "forward", beta: float = 0.5,
              chunk_tokens: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit distillation loss, vocab-parallel; returns ``(loss_sum, count)`` (module docstring).

    With ``p = softmax(z / T)`` over the (true, possibly top-k restricted) vocabulary, per token:

    * ``kind="forward"``: ``T^2 * KL(p_T || p_S) = T^2 * sum_v p_T(v) (log p_T(v) - log p_S(v))``
      (Minitron's choice; mean-seeking).
    * ``kind="reverse"``: ``T^2 * KL(p_S || p_T)`` (mode-seeking).
    * ``kind="jsd"``: ``T^2 * (beta KL(p_T || M) + (1 - beta) KL(p_S || M))``,
      ``M = beta p_T + (1 - beta) p_S`` (generalised JSD; beta=0.5 is the symmetric JSD).

    The explicit ``T^2`` factor (Hinton et al., 2015) keeps the gradient w.r.t. the logits on the
    same scale whatever the temperature: ``d KL(softmax(z/T)) / dz = (p_S - p_T) / T`` and
    ``p_S - p_T`` itself shrinks like ``1/T`` for large T, so without the factor the gradient
    would fall as ``1/T^2``; with it T can be changed without retuning the loss weight. At T=1 the
    factor is 1. The gradient w.r.t. the student logits is ``w_i * T * (p_S - p_T)`` (forward KL).

    ``top_k``: let ``K_i`` be the ids of the teacher's k largest logits of token i over the true
    vocabulary (across all TP shards; ties broken arbitrarily). Both distributions are restricted
    to ``K_i`` and renormalised there: ``p(v) = exp(z(v)/T) / sum_{u in K_i} exp(z(u)/T)`` for
    ``v in K_i`` and 0 elsewhere, for teacher and student alike; the divergence is then taken
    between these two k-point distributions. Student logits outside ``K_i`` get zero gradient.
    ``top_k >= vocab_size`` is the full loss.

    ``chunk_tokens``: tokens per chunk (``None``: all at once); bounds the fp32 intermediates to
    ``chunk_tokens x V_local`` per tensor. Chunked and unchunked results agree (up to summation order).
    ``mask`` weights each token (0: ignored); ``tp_group`` and ``vocab_size`` as in the module
    docstring. Gradients reach ``student_logits`` only, in its dtype.
    """
    _check_kl_args(temperature, kind, beta, top_k)
    s, t = _match_widths(student_logits, teacher_logits.detach(), vocab_size, tp_group)
    if s.shape[:-1] != t.shape[:-1]:
        raise ValueError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} "
                         "cover different tokens")
    lead, v_local = s.shape[:-1], s.shape[-1]
    n = math.prod(lead)
    s2, t2 = s.reshape(n, v_local), t.reshape(n, v_local)
    w = _token_weights(mask, lead, n, s.device)
    valid = _valid_columns(v_local, vocab_size, tp_group, s.device)
    fn = functools.partial(_kl_chunk, temperature=float(temperature), kind=kind, beta=float(beta),
                           top_k=top_k, valid=valid, group=tp_group)
    loss_sum = _ChunkedLoss.apply(fn, chunk_tokens, tp_group, _grad_or_const(s2), t2, w)
    return loss_sum, w.sum()


def fused_output_kl(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                    teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, *,
                    temperature: float = 1.0, mask: Optional[torch.Tensor] = None, tp_group=None,
                    vocab_size: Optional[int] = None, top_k: Optional[int] = None,
                    kind: str = "forward", beta: float = 0.5,
                    chunk_tokens: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`logits_kl` of ``student_hidden @ student_weight.T`` against
    ``teacher_hidden @ teacher_weight.T`` with the output-layer matmuls folded into the chunks, so
    neither model's full logits ever exist. Returns ``(loss_sum, count)``.

    ``student_hidden [..., h]`` / ``teacher_hidden [..., h_t]``: the (TP-replicated) inputs of
    the output layers (after the final norm); ``student_weight [V_local, h]`` /
    ``teacher_weight [V_local, h_t]``: this rank's vocabulary shard of the output layers (same
    padding for both). Gradients reach ``student_hidden`` (all-reduced over ``tp_group``, as
    megatron's ColumnParallelLinear does for its replicated input) and ``student_weight`` (this
    rank's shard; in lower precision the logit gradients of up to 256 MiB of chunks go into one
    matmul in the weight's dtype, and several such products are summed in fp32); the matmuls run
    in the inputs' dtype, the loss in fp32. ``chunk_tokens=None`` picks ``2^22 / V_local`` tokens
    (at least 16): about 16 MiB per fp32 chunk buffer, 85 tokens for a 49152 vocabulary. The other
    arguments are those of :func:`logits_kl`.
    """
    _check_kl_args(temperature, kind, beta, top_k)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher output layers hold {student_weight.shape[0]} and "
                         f"{teacher_weight.shape[0]} vocabulary rows per rank: pad both models' "
                         "vocabularies to the same size")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} cover different tokens")
    lead = student_hidden.shape[:-1]
    n = math.prod(lead)
    hs = student_hidden.reshape(n, student_hidden.shape[-1])
    ht = teacher_hidden.detach().reshape(n, teacher_hidden.shape[-1])
    w = _token_weights(mask, lead, n, hs.device)
    valid = _valid_columns(student_weight.shape[0], vocab_size, tp_group, hs.device)
    fn = functools.partial(_kl_chunk, temperature=float(temperature), kind=kind, beta=float(beta),
                           top_k=top_k, valid=valid, group=tp_group)
    if chunk_tokens is None:
        chunk_tokens = max(16, (1 << 22) // student_weight.shape[0])
    loss_sum = _FusedOutputLoss.apply(fn, chunk_tokens, tp_group, _grad_or_const(hs),
                                      _grad_or_const(student_weight), ht,
                                      teacher_weight.detach(), w)
    return loss_sum, w.sum()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
            tp_group=None, vocab_size: Optional[int] = None,
            chunk_tokens: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Vocab-parallel next-token cross entropy; returns ``(loss_sum, count)``.

    ``labels [...]`` are global vocabulary ids; where ``mask`` is 0 they may be anything (e.g.
    -100), elsewhere they must lie in ``[0, vocab_size)``. Each token's ``lse - z[label]`` is
    counted on the rank holding its label; padding columns are excluded from the log-sum-exp.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    lead, v_local = logits.shape[:-1], logits.shape[-1]
    n = math.prod(lead)
    w = _token_weights(mask, lead, n, logits.device)
    valid = _valid_columns(v_local, vocab_size, tp_group, logits.device)
    fn = functools.partial(_ce_chunk, valid=valid, group=tp_group)
    z = _grad_or_const(logits.reshape(n, v_local))
    loss_sum = _ChunkedLoss.apply(fn, chunk_tokens, tp_group, z, labels.reshape(n).long(), w)
    return loss_sum, w.sum()


# --------------------------------------------------------------------------- offline (cached) teacher
# An offline teacher cache (:mod:`.teacher_cache`) holds, per token, the teacher's k largest
# log-probabilities at temperature T (over the true vocabulary), their vocabulary ids and the log of
# the mass left outside them. The two functions below are the two halves: what the cache stores, and
# the loss a student takes from it. Both work per TP vocabulary shard: only k candidates (build) or
# the k cached log-probabilities (loss) and per-token sums cross ranks.

def teacher_topk(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0,
                 vocab_size: Optional[int] = None, chunk_tokens: Optional[int] = 256,
                 tp_group=None):
    """``(ids int32 [..., k], logp fp32 [..., k], log_rest fp32 [...])`` of ``log_softmax(z / T)``
    over the true vocabulary: the k largest log-probabilities (descending), their global ids, and
    ``log(1 - sum exp(logp))`` computed as the log-sum-exp over the other ids (no cancellation).
    Under TP (``teacher_logits`` this rank's vocabulary shard) the top-k is merged from each
    shard's k candidates and the rest summed over shards; every rank returns the same result."""
    lead, v = teacher_logits.shape[:-1], teacher_logits.shape[-1]
    full = vocab_size or v * _tp(tp_group)[0]
    if not 1 <= k <= full:
        raise ValueError(f"k={k} must lie in [1, vocabulary size {full}]")
    n = math.prod(lead)
    z = teacher_logits.detach().reshape(n, v)
    valid = _valid_columns(v, vocab_size, tp_group, z.device)
    ids = torch.empty(n, k, dtype=torch.int32, device=z.device)
    logp = torch.empty(n, k, dtype=torch.float32, device=z.device)
    rest = torch.empty(n, dtype=torch.float32, device=z.device)
    for i, j in _chunks(n, chunk_tokens):
        y = z[i:j].to(torch.float32, copy=True).div_(temperature)  # never the caller's tensor
        _log_softmax_([y], valid, tp_group)  # padding columns are -inf from here on
        vals, gid = _global_topk(y, None, k, tp_group)
        ids[i:j], logp[i:j] = gid, vals
        y.masked_fill_(_owned_mask(gid, v, tp_group), float("-inf"))
        rest[i:j] = _logsumexp_over_shards(torch.logsumexp(y, dim=-1), tp_group)
    return ids.reshape(*lead, k), logp.reshape(*lead, k), rest.reshape(lead)


def _cached_kl_chunk(s, ids, logp_t, rest_t, w, *, temperature: float, residual: bool,
                     valid: Optional[torch.Tensor], group, want_grad: bool, owned: bool = False):
    """Forward KL of one chunk from cached teacher top-k, and ``d loss / d s`` of this rank's
    vocabulary shard (see :func:`cached_topk_kl`). With ``x = s / T`` and ``p = softmax(x)``:

    * residual: ``L = sum_j q_j (lq_j - lp_j) + q_r (lq_r - lp_r)`` over the k ids and the rest
      bucket; ``dL/dx_v = Q p_v - q_v`` on the ids and ``Q p_v - q_r p_v / p_r`` elsewhere
      (``Q = sum_j q_j + q_r``, 1 up to the cache's rounding, kept exact here).
    * renormalised: both restricted to the k ids and renormalised there (what online ``top_k``
      does): ``dL/dx_v = p~_v - q~_v`` on the ids, 0 elsewhere.

    Under TP each rank reads the student log-probabilities of the cached ids in its shard; one
    ``[c, k]`` all-reduce gives every rank all k of them, and ``p_r`` is each shard's mass outside
    the ids summed over shards. The per-token loss is then the same on every rank: rank 0 reports
    it (the driver sums the ranks' partial losses).
    """
    x = _fp32(s, owned)
    if temperature != 1.0:
        x.div_(temperature)
    _log_softmax_([x], valid, group)  # x = log p_S over the true vocabulary
    local, mine = _owned(ids.long(), x.shape[-1], group)
    lp = _all_reduce_(torch.where(mine, x.gather(-1, local), 0.0), group)
    rows, pos = mine.nonzero(as_tuple=True)
    cols = local[rows, pos]
    lq = logp_t.float()
    grad = None
    if residual:
        lq_r = rest_t.float()
        outside = x.clone()
        outside[rows, cols] = float("-inf")
        lp_r = _logsumexp_over_shards(torch.logsumexp(outside, dim=-1), group)
        del outside
        q, q_r = lq.exp(), lq_r.exp()
        # an empty bucket (k = the whole vocabulary) adds nothing (not 0 * (-inf - -inf))
        tok = (q * (lq - lp)).sum(-1) + torch.where(q_r > 0, q_r * (lq_r - lp_r), 0.0)
        if want_grad:
            big_q = (q.sum(-1) + q_r).unsqueeze(-1)
            # q_r p_v / p_r in log space: p_r may underflow where the teacher's top-k hold it all
            off = x.add(torch.where(q_r > 0, lq_r - lp_r, -float("inf")).unsqueeze(-1)).exp_()
            grad = x.exp_().mul_(big_q).sub_(off)
            del off
            grad[rows, cols] = (lp.exp() * big_q - q)[rows, pos]
    else:
        lq = lq - torch.logsumexp(lq, dim=-1, keepdim=True)
        lp = lp - torch.logsumexp(lp, dim=-1, keepdim=True)
        q = lq.exp()
        tok = (q * (lq - lp)).sum(-1)
        if want_grad:
            grad = x.zero_()
            grad[rows, cols] = (lp.exp() - q)[rows, pos]
    if grad is not None:
        grad.mul_((w * temperature).unsqueeze(-1))
    share = 1.0 if _tp(group)[1] == 0 else 0.0  # the same tok on every rank: counted once
    return (tok * w).sum() * (temperature * temperature * share), grad


def cached_topk_kl(student_logits: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor,
                   log_rest: Optional[torch.Tensor], *, temperature: float = 1.0,
                   mask: Optional[torch.Tensor] = None, vocab_size: Optional[int] = None,
                   residual: bool = True, tp_group=None,
                   chunk_tokens: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``T^2 KL(p_T || p_S)`` per token from a cached teacher (:func:`teacher_topk` outputs, any
    float dtype); returns ``(loss_sum, count)`` like :func:`logits_kl`.

    ``residual=True``: the (k+1)-point KL over the teacher's top-k ids plus one bucket for all other
    ids (teacher mass ``exp(log_rest)``, student mass ``1 - sum_{v in K} p_S(v)``): the student is
    also told how much mass lies outside the top-k. ``residual=False``: both distributions
    restricted to the k ids and renormalised, equal to :func:`logits_kl` with the same ``top_k``.
    ``student_logits [..., V_local]``: this rank's vocabulary shard (the whole padded vocabulary
    without ``tp_group``); ``ids`` (global) / ``logp`` ``[..., k]``, ``log_rest [...]``, the same
    on every TP rank. Gradients reach ``student_logits`` only.
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    lead, v = student_logits.shape[:-1], student_logits.shape[-1]
    if ids.shape != logp.shape or ids.shape[:-1] != lead:
        raise ValueError(f"cached ids {tuple(ids.shape)} / logp {tuple(logp.shape)} do not match "
                         f"the student logits {tuple(student_logits.shape)}")
    if residual and (log_rest is None or log_rest.shape != lead):
        raise ValueError("residual=True needs log_rest with the logits' leading shape")
    n, k = math.prod(lead), ids.shape[-1]
    w = _token_weights(mask, lead, n, student_logits.device)
    valid = _valid_columns(v, vocab_size, tp_group, student_logits.device)
    rest = log_rest.reshape(n) if residual else torch.zeros(n, device=student_logits.device)
    fn = functools.partial(_cached_kl_chunk, temperature=float(temperature), residual=residual,
                           valid=valid, group=tp_group)
    loss_sum = _ChunkedLoss.apply(fn, chunk_tokens, tp_group,
                                  _grad_or_const(student_logits.reshape(n, v)),
                                  ids.reshape(n, k), logp.reshape(n, k), rest, w)
    return loss_sum, w.sum()


def make_projection(h_s: int, h_t: int, *, keep_index: Optional[torch.Tensor] = None,
                    dtype: Optional[torch.dtype] = None, device=None) -> torch.nn.Linear:
    """A learned ``Linear(h_s -> h_t, bias=False)`` mapping student hidden states to the teacher's.

    Initialisation: with ``keep_index`` (the teacher channels the pruned student kept, student
    channel i = teacher channel ``keep_index[i]``) the matrix that puts each kept channel back in
    its place; otherwise the identity when the sizes agree, else a (semi-)orthogonal matrix: an
    isometry when ``h_t >= h_s`` (norms preserved, so the loss starts on the teacher's scale).
    """
    proj = torch.nn.Linear(h_s, h_t, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        if keep_index is not None:
            keep_index = torch.as_tensor(keep_index, dtype=torch.long)
            if keep_index.shape != (h_s,) or keep_index.min() < 0 or keep_index.max() >= h_t:
                raise ValueError(f"keep_index must hold {h_s} teacher channel ids in [0, {h_t})")
            proj.weight.zero_()
            proj.weight[keep_index.to(proj.weight.device), torch.arange(h_s, device=proj.weight.device)] = 1.0
        elif h_s == h_t:
            proj.weight.copy_(torch.eye(h_t))
        else:
            w = torch.empty(h_t, h_s, dtype=torch.float32)
            torch.nn.init.orthogonal_(w)
            proj.weight.copy_(w)
    return proj


def project(student_h: torch.Tensor, projection: Optional[torch.nn.Module]) -> torch.Tensor:
    """``projection(student_h)`` in the projection's dtype (``student_h`` itself without one): the
    student side of :func:`hidden_state_loss`, also used alone when the projected state is
    carried to another pipeline stage (:mod:`.carry`)."""
    if projection is None:
        return student_h
    p = next(projection.parameters(), None)
    return projection(student_h.to(p.dtype) if p is not None else student_h)


def hidden_state_loss(student_h: torch.Tensor, teacher_h: torch.Tensor, *, kind: str = "cosine",
                      projection: Optional[torch.nn.Module] = None,
                      mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Intermediate-state loss between ``student_h [..., h_s]`` and ``teacher_h [..., h_t]``.

    ``projection`` (e.g. from :func:`make_projection`) is applied to the student first; without it
    the sizes must agree. Per token, in fp32: ``cosine``: ``1 - cos(proj(s), t)`` along the hidden
    dim; ``mse``: ``mean_d (proj(s)_d - t_d)^2``. Returns ``(sum_i mask_i * loss_i, sum_i mask_i)``.
    Hidden states are replicated over TP ranks (no sequence parallelism here), so no group is
    needed; with sequence parallelism each rank passes its tokens and the caller sums.
    """
    if kind not in ("cosine", "mse"):
        raise ValueError(f"kind={kind!r}: use cosine or mse")
    s = project(student_h, projection)
    t = teacher_h.detach()
    if s.shape != t.shape:
        raise ValueError(f"student hidden {tuple(s.shape)} vs teacher hidden {tuple(t.shape)}: pass "
                         "a projection (make_projection(h_s, h_t)) when the sizes differ")
    s, t = s.float(), t.float()
    if kind == "cosine":
        per_token = 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)
    else:
        per_token = (s - t).pow(2).mean(dim=-1)
    lead = per_token.shape
    w = _token_weights(mask, lead, math.prod(lead), per_token.device).reshape(lead)
    return (per_token * w).sum(), w.sum()


def dynamic_weight(logit_loss, intermediate_loss, eps: float = 1e-8) -> torch.Tensor:
    """Minitron's dynamic weight ``alpha = L_logits / L_intermediate`` (a detached fp32 scalar).

    ``alpha * L_intermediate`` then has the logit loss's magnitude (its gradient still flows
    through ``L_intermediate``; alpha itself is a constant). Pass both losses with the same
    normalisation (e.g. token means); for an alpha identical on all data-parallel ranks pass
    globally reduced means.
    """
    num = torch.as_tensor(logit_loss).detach().float()
    den = torch.as_tensor(intermediate_loss).detach().float()
    return num / (den + eps)


def combine(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``sum_k weights[k] * losses[k]``; a loss without a weight counts once, a weight without a
    loss is an error (a misspelt name), a weight of exactly 0 drops its term (even a NaN one)."""
    if not losses:
        raise ValueError("combine: no losses given")
    unknown = sorted(set(weights) - set(losses))
    if unknown:
        raise ValueError(f"combine: weights for unknown losses {unknown}; losses are {sorted(losses)}")
    total = None
    for name, value in losses.items():
        wgt = weights.get(name, 1.0)
        if not torch.is_tensor(wgt) and wgt == 0:
            continue
        term = value * wgt
        total = term if total is None else total + term
    if total is None:
        first = next(iter(losses.values()))
        total = torch.zeros((), dtype=torch.float32, device=getattr(first, "device", None))
    return total


def check_vocab(student_vocab: int, teacher_vocab: int, student_padded: Optional[int] = None,
                teacher_padded: Optional[int] = None) -> int:
    """Check that student and teacher share a vocabulary; returns the common true size.

    Only the true sizes are compared: different paddings of the output layer are fine (the loss
    masks padding columns; under TP both must however hold the same number of rows per rank).
    """
    for name, true, padded in (("student", student_vocab, student_padded),
                               ("teacher", teacher_vocab, teacher_padded)):
        if padded is not None and padded < true:
            raise ValueError(f"{name} padded vocabulary {padded} is smaller than its vocabulary {true}")
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"student vocabulary ({student_vocab} tokens) differs from the teacher's ({teacher_vocab} "
            "tokens): logit distillation compares distributions over the same token ids, so both "
            "models must use the same tokenizer. Prune/derive the student from the teacher (or "
            "retokenize and re-train one of them with the other's tokenizer)")
    return int(student_vocab)

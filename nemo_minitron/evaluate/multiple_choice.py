"""Multiple-choice log-likelihood scoring (lm-evaluation-harness style) at any TP/PP/DP layout.

Each ``(context, continuation)`` request is tokenised as the harness does: trailing whitespace of
the context moves to the continuation, the continuation's tokens are those of
``context + continuation`` after the context's own tokens, an empty context becomes the BOS (else
EOS) token, and the model reads ``(context + continuation)[:-1]`` left-truncated to ``max_length``.
The score of a continuation is the sum of its tokens' log-probabilities, computed vocab-parallel
from the last stage's logits (only the continuation positions, never the full vocabulary gathered;
the output layer itself runs on those positions alone, :mod:`..runtime.selected_logits`).

Requests that feed the model the very same tokens (``" A"``..``" D"`` after one MMLU prompt) share
one row; where the model allows it, so do all continuations of one context (the context read once,
each continuation after it with its own positions and a mask that keeps the others out of sight:
:mod:`.rows`, :mod:`..runtime.shared_context`). Rows are sorted longest first, each data-parallel
rank forwards a strided slice of them in micro-batches padded on the right (causal attention:
padding never reaches a scored position), and the per-request sums are all-reduced so every rank
returns every score. Under expert parallelism the dispatcher gathers equal-shaped tokens from every
expert-parallel rank, so every data-parallel rank then forwards as many micro-batches as the
busiest one, each padded to the longest of that position over the ranks (extra micro-batches are
padding alone, scoring nothing); each rank works the other ranks' shapes out from the same
requests, without a collective.

:func:`score_continuations` is the token-level core (also used by the lm-evaluation-harness
adapter, :mod:`.lm_eval_adapter`): it takes ``(context_ids, continuation_ids)`` pairs and returns
each continuation's log-probability and whether greedy decoding would have produced it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Sequence

import torch

from ..runtime.collectives import all_reduce_max
from ..runtime.forward import (all_reduce_sum, mask_padded_vocab, on_device, run_forward,
                               token_losses)
from ..runtime.parallel import Parallel, current
from ..runtime.selected_logits import Selected, final_hidden
from ..report.judge import chance, stderr
from ..runtime.shared_context import rope_follows_position_ids, supported
from .rows import build_rows, make_batch
from .tasks import Item, load_task, resolved_split

PP_SEQ_BUCKET = 64  # under pipeline parallelism a run needs one micro-batch shape: round lengths


def _encode(tokenizer, texts: list[str]) -> dict[str, list[int]]:
    uniq = list(dict.fromkeys(texts))
    if not uniq:
        return {}
    ids = tokenizer(uniq, add_special_tokens=False)["input_ids"]
    return dict(zip(uniq, ids))


def prefix_token(tokenizer) -> int:
    """The token an empty context becomes (BOS, else EOS), as in the harness."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("tokenizer has neither a BOS nor an EOS token for empty contexts")


def encode_requests(tokenizer, requests: Sequence[tuple[str, str]]
                    ) -> list[tuple[list[int], list[int]]]:
    """``(context_tokens, continuation_tokens)`` of each request, the harness' way."""
    pairs = []
    for ctx, cont in requests:
        n_spaces = len(ctx) - len(ctx.rstrip())
        if n_spaces > 0:
            cont = ctx[-n_spaces:] + cont
            ctx = ctx[:-n_spaces]
        pairs.append((ctx, cont))
    enc = _encode(tokenizer, [c for c, _ in pairs if c] + [c + k for c, k in pairs])
    prefix = prefix_token(tokenizer)
    out = []
    for ctx, cont in pairs:
        whole = enc[ctx + cont]
        if ctx:
            ctx_ids = enc[ctx]
            cont_ids = whole[len(ctx_ids):]
        else:
            ctx_ids, cont_ids = [prefix], whole
        if not cont_ids:
            raise ValueError(f"continuation {cont!r} after {ctx[-60:]!r} tokenises to nothing")
        out.append((list(ctx_ids), list(cont_ids)))
    return out


def _not_argmax(sel: torch.Tensor, tgt: torch.Tensor, vocab_size: int,
                par: Parallel) -> torch.Tensor:
    """Per selected position: is the target token *not* the argmax of the (vocab-parallel)
    logits ``sel`` [n, V/tp]? Reads ``sel`` only (the cross entropy later works in place)."""
    logits = mask_padded_vocab(sel.float(), vocab_size)
    local = logits.shape[-1]
    start = par.tp_rank * local
    best = logits.max(-1).values
    own = (tgt >= start) & (tgt < start + local)
    mine = logits.gather(1, (tgt - start).clamp(0, local - 1)[:, None])[:, 0]
    mine = torch.where(own, mine, torch.full_like(mine, float("-inf")))
    if par.tp > 1:
        all_reduce_max(best, par.tp_group)
        all_reduce_max(mine, par.tp_group)
    return mine < best


def score_requests(shard, tokenizer, requests: Sequence[tuple[str, str]], *,
                   micro_batch_size: int = 8, max_length: int | None = None,
                   dp_rank: int | None = None, dp_size: int | None = None,
                   progress: bool | str = True, par: Parallel | None = None) -> list[float]:
    """Sum log-probability of each ``(context, continuation)``; collective over all ranks.

    ``dp_rank``/``dp_size`` default to ``par``'s data-parallel rank and size (``par``: the live
    layout unless given). Every rank must call with the same requests and gets all scores back.
    """
    if not requests:
        return []
    scored = score_continuations(shard, encode_requests(tokenizer, requests),
                                 micro_batch_size=micro_batch_size, max_length=max_length,
                                 dp_rank=dp_rank, dp_size=dp_size, progress=progress, par=par)
    return [lp for lp, _ in scored]


def _my_batches(encoded, max_length: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                pp: int, same_shapes: bool = False, share: bool = False,
                window: int | None = None) -> list[dict]:
    """This data-parallel rank's micro-batches: the rows longest first, dealt round-robin; under
    PP each padded to a bucketed length so that runs share a shape; with ``same_shapes`` (expert
    parallelism) as many and as shaped as every other rank's (see the module note). ``share``:
    a context's continuations in one row (:mod:`.rows`), unless a row would be longer than the
    model's sliding attention ``window`` (its tokens would then be further apart in the row than
    in their own request: each request gets its own row instead)."""
    rows = build_rows(encoded, max_length, share)
    if share and window is not None and any(len(r.tokens) > window for r in rows):
        rows = build_rows(encoded, max_length, False)
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].tokens), rows[i].tokens))

    def seq_len_of(ids):
        s = max(len(rows[i].tokens) for i in ids)
        if pp > 1:
            s = min(-(-s // PP_SEQ_BUCKET) * PP_SEQ_BUCKET, max_length)
        return s

    def chunks(rank):
        ids = order[rank::dp_size]
        return [ids[k:k + micro_batch_size] for k in range(0, len(ids), micro_batch_size)]

    mine = chunks(dp_rank)
    if not same_shapes:
        return [make_batch(rows, ids, seq_len_of(ids), 0) for ids in mine]
    every = [chunks(r) for r in range(dp_size)]
    lens = [max(seq_len_of(c[k]) for c in every if k < len(c))
            for k in range(max(len(c) for c in every))]
    return [make_batch(rows, mine[k] if k < len(mine) else [], n, 0, micro_batch_size)
            for k, n in enumerate(lens)]


def _pipeline_runs(batches: list[dict], pp: int) -> list[list[dict]]:
    """One pipeline run needs one micro-batch shape under PP; without PP, one run for all."""
    groups: list[list[dict]] = []
    for b in batches:
        if pp > 1 and groups and groups[-1][0]["tokens"].shape == b["tokens"].shape:
            groups[-1].append(b)
        elif pp == 1 and groups:
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


def _continuation_scorer(vocab: int, par: Parallel, picked: Selected):
    """``on_logits`` of :func:`run_forward`: per request, the summed log-probability of its
    continuation tokens and how many of them are not the argmax. ``picked`` makes the logits of
    the selected positions from the model's output (hidden states under ``final_hidden``)."""
    def on_logits(output, batch):
        sel = picked.logits_at(output, batch["sel_row"], batch["sel_pos"])  # [n_tok, V/tp]
        miss = _not_argmax(sel, batch["sel_tgt"], vocab, par)
        lp = -token_losses(sel.unsqueeze(0), batch["sel_tgt"].unsqueeze(0), vocab)[0]
        sums = torch.zeros(2, batch["reqs"].numel(), dtype=torch.float64, device=lp.device)
        sums[0].index_add_(0, batch["owner"], lp.double())
        sums[1].index_add_(0, batch["owner"], miss.double())
        return {"reqs": batch["reqs"], "logprob": sums[0], "misses": sums[1]}

    return on_logits


def _gather_scores(outs: list[dict], n: int, par: Parallel) -> list[tuple[float, bool]]:
    """Every rank's results summed into one (logprob, greedy) per request, on every rank."""
    total = torch.zeros(3, n, dtype=torch.float64)  # logprob, n, misses
    if par.last_stage and par.tp_rank == 0:
        for o in outs:
            reqs = o["reqs"].to(total.device)
            total[0].index_add_(0, reqs, o["logprob"].to(total.device))
            total[1].index_add_(0, reqs, torch.ones_like(o["logprob"], device=total.device))
            total[2].index_add_(0, reqs, o["misses"].to(total.device))
    total = all_reduce_sum(total)
    if (total[1] == 0).any():
        raise RuntimeError(f"{int((total[1] == 0).sum())} requests were scored by no rank")
    return list(zip((total[0] / total[1]).tolist(), (total[2] == 0).tolist()))


def score_continuations(shard, encoded: Sequence[tuple[list[int], list[int]]], *,
                        micro_batch_size: int = 8, max_length: int | None = None,
                        dp_rank: int | None = None, dp_size: int | None = None,
                        progress: bool | str = True, par: Parallel | None = None,
                        share_context: bool | None = None) -> list[tuple[float, bool]]:
    """``(sum log-probability, greedy)`` of each ``(context_ids, continuation_ids)``: the
    continuation's tokens scored after the context, the input left-truncated to ``max_length``
    tokens; ``greedy`` is whether every continuation token is the argmax at its position.

    Collective over all ranks: every rank calls with the same requests and gets every result.
    ``dp_rank``/``dp_size`` default to ``par``'s data-parallel rank and size (``par``: the live
    layout unless given). ``share_context``: the continuations of one context in one row
    (:mod:`.rows`); default: wherever the model supports it
    (:func:`..runtime.shared_context.supported`).
    """
    par = par or current()
    dp_rank = par.dp_rank if dp_rank is None else dp_rank
    dp_size = par.dp if dp_size is None else dp_size
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} not in [0, {dp_size})")
    max_length = max_length or shard.arch.max_position_embeddings
    if not encoded:
        return []
    if share_context is None:
        share_context = supported(shard.model)
    limit = shard.arch.longrope_context  # LongRoPE's tables past it are one per forward, not
    if share_context and limit is not None and any(  # per request: one request per row there
            len(r.tokens) > limit for r in build_rows(encoded, max_length, True)):
        share_context = False
    batches = _my_batches(encoded, max_length, dp_rank, dp_size, micro_batch_size, par.pp,
                          same_shapes=par.ep > 1 and shard.arch.is_moe, share=share_context,
                          window=shard.arch.sliding_window)
    groups = _pipeline_runs(batches, par.pp)
    label = (progress if isinstance(progress, str) else "multiple choice") if progress else None
    outs = []
    rope = rope_follows_position_ids(shard.model) if share_context else contextlib.nullcontext()
    # the output layer only where a score reads it
    with final_hidden(shard.model) as picked, rope:
        on_logits = _continuation_scorer(shard.arch.vocab_size, par, picked)
        if len(groups) == 1:  # run_forward shows the bar (global rank 0)
            outs = run_forward(shard, [on_device(b) for b in groups[0]], on_logits,
                               progress=label)
        else:
            with par.progress(total=len(batches), desc=label, unit="batch",
                              disable=not label) as bar:
                for g in groups:
                    outs += run_forward(shard, [on_device(b) for b in g], on_logits)
                    bar.update(len(g))
    return _gather_scores(outs, len(encoded), par)


def score_items(shard, tokenizer, items: Sequence[Item], *, micro_batch_size: int = 8,
                max_length: int | None = None, dp_rank: int | None = None,
                dp_size: int | None = None, progress: bool | str = True,
                par: Parallel | None = None) -> list[list[float]]:
    """Sum log-probability of every choice of every item (``scores[i][j]`` for item i, choice j).

    Collective: every rank (all TP/PP/DP ranks) calls with the same items and gets all scores.
    Each data-parallel rank forwards a disjoint slice; ``dp_rank``/``dp_size`` default to
    ``par``'s data-parallel group (pass ``0``/``1`` to have every replica score everything).
    ``max_length`` (default ``arch.max_position_embeddings``) left-truncates long inputs.
    """
    reqs, sizes = [], []
    for it in items:
        r = it.requests()
        reqs += r
        sizes.append(len(r))
    flat = score_requests(shard, tokenizer, reqs, micro_batch_size=micro_batch_size,
                          max_length=max_length, dp_rank=dp_rank, dp_size=dp_size,
                          progress=progress, par=par)
    out, k = [], 0
    for n in sizes:
        out.append(flat[k:k + n])
        k += n
    return out


def predictions(items: Sequence[Item], scores: Sequence[Sequence[float]]) -> list[tuple[int, int]]:
    """``(pred, pred_norm)`` per item: argmax of the sum log-probability, and of it divided by
    the choice's length in characters (first index on ties, as ``numpy.argmax``)."""
    out = []
    for it, sc in zip(items, scores, strict=True):
        lens = it.norm_lengths()
        pred = max(range(len(sc)), key=lambda j: (sc[j], -j))
        pred_norm = max(range(len(sc)), key=lambda j: (sc[j] / lens[j], -j))
        out.append((pred, pred_norm))
    return out


def accuracy(items: Sequence[Item], scores: Sequence[Sequence[float]]) -> dict:
    """``acc`` (argmax of sum log-probability), ``acc_norm`` (of log-probability per character of
    the choice), their standard errors (as the harness reports them), ``n`` and ``chance`` (the
    accuracy of guessing, from each item's number of choices)."""
    preds = predictions(items, scores)
    n = len(items)
    if n == 0:
        return {"acc": float("nan"), "acc_norm": float("nan"), "n": 0, "chance": float("nan")}
    acc = sum(p == it.label for (p, _), it in zip(preds, items)) / n
    acc_norm = sum(q == it.label for (_, q), it in zip(preds, items)) / n
    return {"acc": acc, "acc_norm": acc_norm, "acc_stderr": stderr(acc, n),
            "acc_norm_stderr": stderr(acc_norm, n), "n": n,
            "chance": chance([len(it.choices) for it in items])}


def evaluate_tasks(shard, tokenizer, tasks: Sequence[str], limit: int | None = None,
                   num_fewshot: int = 0, *, seed: int = 1234, micro_batch_size: int = 8,
                   max_length: int | None = None, split: str | dict | None = None, data_dir=None,
                   dp_rank: int | None = None, dp_size: int | None = None,
                   progress: bool = True, par: Parallel | None = None) -> dict:
    """Accuracy of the model on each task; collective (every rank calls and gets the result).

    Returns ``{"results": {task: {acc, acc_norm, acc_stderr, acc_norm_stderr, n, split,
    seconds}}, "settings": {...}}`` where the settings are everything needed to reproduce it.
    ``split``: one split for every task, or ``{task: split}`` (e.g. ``{"mmlu": "test"}``); tasks
    not named use their default (validation). ``par``: the layout (default: the live one).
    """
    par = par or current()
    max_length = max_length or shard.arch.max_position_embeddings
    results = {}
    t_all = time.time()
    for name in tasks:
        t0 = time.time()
        sp = split.get(name) if isinstance(split, dict) else split
        items = load_task(name, limit=limit, num_fewshot=num_fewshot, seed=seed, split=sp,
                          data_dir=data_dir)
        scores = score_items(shard, tokenizer, items, micro_batch_size=micro_batch_size,
                             max_length=max_length, dp_rank=dp_rank, dp_size=dp_size,
                             progress=name if progress else False, par=par)
        res = accuracy(items, scores)
        res.update(split=resolved_split(name, sp), seconds=round(time.time() - t0, 2))
        results[name] = res
    dtype = str(getattr(shard.config, "params_dtype", "")).replace("torch.", "")
    settings = {
        "tasks": list(tasks), "limit": limit, "num_fewshot": num_fewshot, "fewshot_seed": seed,
        "split": split, "micro_batch_size": micro_batch_size, "max_length": max_length,
        "dtype": dtype, "tokenizer": getattr(tokenizer, "name_or_path", None),
        "layout": {**par.layout, **({} if dp_size is None else {"dp": dp_size})},
        "scoring": "sum of continuation token log-probs (harness tokenisation); acc_norm divides "
                   "by the choice's length in characters",
        "seconds": round(time.time() - t_all, 2),
    }
    return {"results": results, "settings": settings}

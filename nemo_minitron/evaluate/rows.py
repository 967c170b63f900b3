"""The rows a scoring forward reads, and their micro-batches.

A request ``(context_ids, continuation_ids)`` is scored from the model input
``(context + continuation)[:-1]``, left-truncated to ``max_length``: the continuation's tokens are
read at its last ``len(continuation)`` positions. Requests that feed the model the very same
tokens (``" A"``..``" D"`` after one MMLU prompt) share one row.

With ``share=True`` the requests of one context go into one row instead,
``context + k1[:-1] + k2[:-1] + ...`` with each continuation's position ids and a mask that keeps
the continuations apart (:mod:`..runtime.shared_context`): the first token of every continuation
is read at the context's last position, the others inside its own span. A row that would exceed
``max_length`` is split (each part repeats the context); a request that needs left truncation
keeps its own plain row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..runtime.shared_context import mask_from_segments


@dataclass
class Row:
    tokens: list[int]
    # (request, continuation ids, the positions whose next-token logits score them)
    owners: list[tuple[int, list[int], list[int]]] = field(default_factory=list)
    positions: list[int] | None = None  # None: 0..len-1
    segments: list[int] | None = None  # None: plain causal; else 0 context, k > 0 continuation k


def _check(cont_ids: list[int], max_length: int) -> None:
    if len(cont_ids) > max_length:
        raise ValueError(f"a continuation of {len(cont_ids)} tokens exceeds max_length="
                         f"{max_length}")


def build_rows(encoded: Sequence[tuple[list[int], list[int]]], max_length: int,
               share: bool = False) -> list[Row]:
    """The rows that score every request of ``encoded`` (see the module note)."""
    rows: list[Row] = []
    plain_index: dict[tuple, int] = {}

    def plain(req: int, ctx: list[int], cont: list[int]) -> None:
        inp = (ctx + cont)[-(max_length + 1):][:-1]
        key = tuple(inp)
        if key not in plain_index:
            plain_index[key] = len(rows)
            rows.append(Row(inp))
        rows[plain_index[key]].owners.append((req, cont, list(range(len(inp) - len(cont),
                                                                    len(inp)))))

    groups: dict[tuple, list[int]] = {}
    for req, (ctx, cont) in enumerate(encoded):
        _check(cont, max_length)
        if share and len(ctx) + len(cont) - 1 <= max_length:
            groups.setdefault(tuple(ctx), []).append(req)
        else:
            plain(req, ctx, cont)
    for ctx, reqs in groups.items():
        rows += _shared_rows(list(ctx), [(r, encoded[r][1]) for r in reqs], max_length)
    return rows


def _shared_rows(ctx: list[int], requests: list[tuple[int, list[int]]],
                 max_length: int) -> list[Row]:
    """The continuations of one context packed after it, in as few rows as ``max_length``
    allows; identical continuations read the same positions."""
    n_ctx = len(ctx)
    out: list[Row] = []
    row = None
    spans: dict[tuple, list[int]] = {}

    def close() -> None:
        if row is not None:
            if max(row.segments) <= 1:  # one continuation span at most: a plain causal row
                row.positions = row.segments = None
            out.append(row)

    for req, cont in requests:
        key = tuple(cont)
        extra = len(cont) - 1
        if row is None or (key not in spans and len(row.tokens) + extra > max_length):
            close()
            row = Row(list(ctx), [], list(range(n_ctx)), [0] * n_ctx)
            spans = {}
        if key not in spans:
            start = len(row.tokens)
            seg = max(row.segments) + 1 if extra else 0
            row.tokens += cont[:-1]
            row.positions += range(n_ctx, n_ctx + extra)
            row.segments += [seg] * extra
            spans[key] = [n_ctx - 1] + list(range(start, start + extra))
        row.owners.append((req, cont, spans[key]))
    close()
    return out


def make_batch(rows: Sequence[Row], row_ids: Sequence[int], seq_len: int, pad_id: int,
               b: int = 0) -> dict:
    """The micro-batch of ``row_ids``, padded to ``seq_len`` tokens and to ``b`` rows. Carries an
    ``attention_mask`` when one of its rows is a shared-context row."""
    b = max(b, len(row_ids))
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.long)
    position_ids = torch.arange(seq_len).expand(b, seq_len).clone()
    shared = any(rows[rid].segments is not None for rid in row_ids)
    segments = torch.full((b, seq_len), -1, dtype=torch.long) if shared else None
    sel_row, sel_pos, sel_tgt, owner, reqs = [], [], [], [], []
    for r, rid in enumerate(row_ids):
        row = rows[rid]
        n = len(row.tokens)
        tokens[r, :n] = torch.tensor(row.tokens, dtype=torch.long)
        if row.positions is not None:
            position_ids[r, :n] = torch.tensor(row.positions, dtype=torch.long)
        if segments is not None:
            segments[r, :n] = 0 if row.segments is None else torch.tensor(row.segments)
        for req, cont, at in row.owners:
            k = len(reqs)
            reqs.append(req)
            sel_row += [r] * len(cont)
            sel_pos += at
            sel_tgt += cont
            owner += [k] * len(cont)
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    batch = {"tokens": tokens, "position_ids": position_ids, "sel_row": t(sel_row),
             "sel_pos": t(sel_pos), "sel_tgt": t(sel_tgt), "owner": t(owner), "reqs": t(reqs)}
    if segments is not None:
        batch["attention_mask"] = mask_from_segments(segments)
    return batch

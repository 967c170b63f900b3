"""Ranking candidates and comparing rankings."""

from __future__ import annotations

import itertools


def _key(row: dict, rank_by: str, prefix: str):
    """Sort key (smaller is better) of one candidate, or None when it has no result yet."""
    if rank_by == "val_loss":
        v = row.get(f"{prefix}_loss")
        return None if v is None else v
    acc = row.get(f"{prefix}_tasks", {}).get(rank_by)
    return None if acc is None else -acc


def rank_results(rows: list[dict], rank_by: str) -> list[dict]:
    """Rows sorted best first by ``rank_by`` (``val_loss`` or a task's accuracy) after the short
    distillation, with ``rank`` (1 = best) set on rows that have a result and ``confirm_rank`` on
    rows that have a confirmation result; rows without results go last, in index order."""
    for prefix, field in (("val", "rank"), ("confirm", "confirm_rank")):
        scored = [r for r in rows if _key(r, rank_by, prefix) is not None]
        for i, r in enumerate(sorted(scored, key=lambda r: (_key(r, rank_by, prefix), r["index"])), 1):
            r[field] = i
    return sorted(rows, key=lambda r: (r.get("rank") is None, r.get("rank") or 0, r["index"]))


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a between two score lists over the same items (1: same order, -1: reversed)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("kendall_tau needs two lists of the same length >= 2")
    s = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        s += (da * db > 0) - (da * db < 0)
    return s / (len(a) * (len(a) - 1) / 2)

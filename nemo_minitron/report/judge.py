"""How to read downstream accuracies: chance level, standard error, retained above-chance accuracy.

A raw accuracy says little on its own: 0.45 on a 2-choice task is below chance, on a 4-choice task
well above it, and on 100 items its standard error is ~0.05. Minitron's question is how much of
the teacher's skill the student keeps, and only the part above chance is skill:

    retained = (acc_student - chance) / (acc_teacher - chance)

1 = the teacher's skill kept, 0 = guessing, < 0 = worse than guessing. Pure functions over the
result dicts ``multiple_choice.accuracy`` writes (``acc_norm``, ``acc_norm_stderr``, ``chance``,
``n``); results written before ``chance`` was recorded have no chance level, and nothing is
derived from them.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence


def stderr(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` over ``n`` items, sqrt(p(1-p)/(n-1)) (the harness'
    sample standard deviation of 0/1 outcomes over sqrt(n)); NaN for fewer than 2 items."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def chance(num_choices: Sequence[int]) -> float:
    """Expected accuracy of uniform guessing: the mean of 1/choices over the items (ARC mixes
    3-, 4- and 5-choice questions, so this is not always 1/k)."""
    if not num_choices:
        return float("nan")
    return sum(1.0 / k for k in num_choices) / len(num_choices)


def retained(student: float, teacher: float, chance_level: float) -> float | None:
    """(student - chance) / (teacher - chance); None when the teacher is not above chance
    (there is no skill to retain)."""
    gap = teacher - chance_level
    if not gap > 0:
        return None
    return (student - chance_level) / gap


def task_rows(evals: Mapping[str, dict], metric: str = "acc_norm",
              teacher: str = "teacher") -> list[dict]:
    """One row per task over several models' evaluation results (``{who: result}``, each as
    ``minitron evaluate`` writes it): chance, items, and per model ``metric`` and its stderr, and
    for every model but ``teacher`` the retained above-chance ratio."""
    per = {who: r.get("tasks", {}).get("results", {}) for who, r in evals.items()}
    names = sorted({t for res in per.values() for t in res})
    rows = []
    for t in names:
        row = {"task": t, "chance": None, "n": None, "acc": {}, "stderr": {}, "retained": {}}
        for who, res in per.items():
            if t not in res or metric not in res[t]:
                continue
            r = res[t]
            row["acc"][who] = float(r[metric])
            row["stderr"][who] = r.get(f"{metric}_stderr")
            row["n"] = row["n"] or r.get("n")
            if r.get("chance") is not None:
                row["chance"] = float(r["chance"])
        if row["chance"] is not None and teacher in row["acc"]:
            for who, a in row["acc"].items():
                if who != teacher:
                    row["retained"][who] = retained(a, row["acc"][teacher], row["chance"])
        rows.append(row)
    return rows


def mean_retained(rows: list[dict], who: str) -> float | None:
    """Mean retained ratio of ``who`` over the tasks that have one (None if none has)."""
    vals = [r["retained"][who] for r in rows if r["retained"].get(who) is not None]
    return sum(vals) / len(vals) if vals else None


def fmt_acc(acc: float | None, err: float | None) -> str:
    """``0.450 ± 0.050`` (just the accuracy when no stderr is known; — when absent)."""
    if acc is None:
        return "—"
    if err is None or (isinstance(err, float) and math.isnan(err)):
        return f"{acc:.3f}"
    return f"{acc:.3f} ± {err:.3f}"


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"

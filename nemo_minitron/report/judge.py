"""How to read downstream accuracies: chance level, standard error, retained above-chance accuracy.

A raw accuracy says little on its own: 0.45 on a 2-choice task is below chance, on a 4-choice task
well above it, and on 100 items its standard error is ~0.05. Minitron's question is how much of
the teacher's skill the student keeps, and only the part above chance is skill:

    retained = (acc_student - chance) / (acc_teacher - chance)

1 = the teacher's skill kept, 0 = guessing, < 0 = worse than guessing. Its standard error (first
order in both accuracies' errors, the two taken as independent) says how far a few hundred items
let one trust it: with 300 items and a teacher 0.15 above chance it is ~0.2 per task, so a mean
over three tasks moves by ~0.1 with the sample of items alone. Pure functions over the
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


def retained_stderr(student: float, student_err: float | None, teacher: float,
                    teacher_err: float | None, chance_level: float) -> float | None:
    """Standard error of :func:`retained`, to first order:
    sqrt(err_s² + (retained · err_t)²) / (teacher − chance). The two accuracies are taken as
    independent samples; scored on the same items they tend to err together, so this errs on
    the wide side. None without both errors or without a teacher above chance."""
    r = retained(student, teacher, chance_level)
    errs = (student_err, teacher_err)
    if r is None or any(e is None or math.isnan(e) for e in errs):
        return None
    return math.sqrt(student_err ** 2 + (r * teacher_err) ** 2) / (teacher - chance_level)


def task_rows(evals: Mapping[str, dict], metric: str = "acc_norm",
              teacher: str = "teacher") -> list[dict]:
    """One row per task over several models' evaluation results (``{who: result}``, each as
    ``minitron evaluate`` writes it): chance, items, and per model ``metric`` and its stderr, and
    for every model but ``teacher`` the retained above-chance ratio and its standard error."""
    per = {who: r.get("tasks", {}).get("results", {}) for who, r in evals.items()}
    names = sorted({t for res in per.values() for t in res})
    rows = []
    for t in names:
        row = {"task": t, "chance": None, "n": None, "acc": {}, "stderr": {}, "retained": {},
               "retained_stderr": {}}
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
                    row["retained_stderr"][who] = retained_stderr(
                        a, row["stderr"].get(who), row["acc"][teacher],
                        row["stderr"].get(teacher), row["chance"])
        rows.append(row)
    return rows


def mean_retained(rows: list[dict], who: str) -> float | None:
    """Mean retained ratio of ``who`` over the tasks that have one (None if none has)."""
    vals = [r["retained"][who] for r in rows if r["retained"].get(who) is not None]
    return sum(vals) / len(vals) if vals else None


def mean_retained_stderr(rows: list[dict], who: str) -> float | None:
    """Standard error of :func:`mean_retained` (tasks scored on separate items are independent:
    the root of the summed variances over the number of tasks); None if a task lacks one."""
    errs = [r.get("retained_stderr", {}).get(who) for r in rows
            if r["retained"].get(who) is not None]
    if not errs or any(e is None for e in errs):
        return None
    return math.sqrt(sum(e * e for e in errs)) / len(errs)


def fmt_acc(acc: float | None, err: float | None) -> str:
    """``0.450 ± 0.050`` (just the accuracy when no stderr is known; — when absent)."""
    if acc is None:
        return "—"
    if err is None or (isinstance(err, float) and math.isnan(err)):
        return f"{acc:.3f}"
    return f"{acc:.3f} ± {err:.3f}"


def fmt_ratio(x: float | None, err: float | None = None) -> str:
    """``0.35`` or, with a standard error, ``0.35 ± 0.10`` (— when absent)."""
    if x is None:
        return "—"
    return f"{x:.2f}" if err is None else f"{x:.2f} ± {err:.2f}"

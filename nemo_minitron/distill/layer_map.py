"""Which student layer to compare with which teacher layer, read from how the student was pruned.

``kd.auto_hidden_pairs=true`` builds ``kd.hidden_pairs`` from the student's ``plan.json`` (written
by ``minitron prune`` and by each search candidate), so the pairs follow whatever depth a plan or
a search picked. The plan keeps teacher layers ``K = [k_0 < k_1 < ... < k_{n-1}]``: student layer
``i`` starts as teacher layer ``k_i``. Its output is what student layer ``i+1`` (teacher layer
``k_{i+1}``) reads, and in the teacher that input is the output of layer ``k_{i+1} - 1``. So the
pairs are ``(i, k_{i+1} - 1)``, and ``(n-1, L-1)`` for the last student layer (both feed the
final norm of a teacher with ``L`` layers). Where nothing was removed after layer ``i`` this is
``(i, k_i)``; the layer just before a removed block is asked to produce what the teacher has after
the whole block, which is what the gap must learn to bridge.
"""

from __future__ import annotations

import json
from pathlib import Path


def plan_of(student_dir, teacher_dir) -> dict | None:
    """The student's plan.json when the student was pruned from ``teacher_dir`` itself; else None."""
    f = Path(student_dir) / "plan.json"
    if teacher_dir is None or not f.is_file():
        return None
    plan = json.loads(f.read_text())
    parent = plan.get("meta", {}).get("parent")
    if parent is None or Path(parent).resolve() != Path(teacher_dir).resolve():
        return None
    return plan


def pairs_from_kept(kept: list[int], teacher_layers: int) -> list[tuple[int, int]]:
    """``[(student_layer, teacher_layer)]`` for a student keeping teacher layers ``kept``."""
    if not kept or sorted(set(kept)) != list(kept) or kept[0] < 0 or kept[-1] >= teacher_layers:
        raise ValueError(f"kept layers {kept} are not increasing layer numbers of a "
                         f"{teacher_layers}-layer teacher")
    nxt = list(kept[1:]) + [teacher_layers]
    return [(i, k - 1) for i, k in enumerate(nxt)]


def auto_pairs(student_dir, teacher_dir, student_layers: int,
               teacher_layers: int) -> list[tuple[int, int]]:
    """The pairs of ``kd.auto_hidden_pairs`` for this student and teacher, or a clear error."""
    plan = plan_of(student_dir, teacher_dir)
    if plan is None:
        raise ValueError(
            f"kd.auto_hidden_pairs=true reads the layers the student kept from its plan.json, but "
            f"{student_dir} was not pruned from the teacher {teacher_dir} (no plan.json, or its "
            "parent is another checkpoint); give explicit kd.hidden_pairs=[[student, teacher], "
            "...] instead")
    kept = list(plan.get("keep", {}).get("layers") or [])
    if len(kept) != student_layers or plan.get("source", {}).get("num_layers") != teacher_layers:
        raise ValueError(f"{student_dir}/plan.json keeps {len(kept)} of "
                         f"{plan.get('source', {}).get('num_layers')} layers, but the student has "
                         f"{student_layers} and the teacher {teacher_layers}: the plan does not "
                         "describe these checkpoints; give explicit kd.hidden_pairs")
    return pairs_from_kept(kept, teacher_layers)

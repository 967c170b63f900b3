"""Carrying hidden states of cross-stage layer pairs down the pipeline.

A pair ``[student_layer, teacher_layer]`` whose two layers sit on different pipeline stages gets
its loss on the *later* of the two stages; the state captured on the earlier stage travels there
as extra channels of the tensor that :class:`~.pair.DistillPair` sends between stages.

Every cross-stage pair owns one **slot** of ``h_t`` channels (teacher width) for the whole
pipeline, so the p2p tensor has the same width on every stage (megatron sizes its buffers once):
``[student_hidden | teacher_hidden | slot 0 | slot 1 | ...]``. A slot holds either

* ``side="s"``: the student's state, already mapped to the teacher's width by the pair's
  projection (which lives on the student layer's stage, as for same-stage pairs); it keeps its
  autograd graph, so the loss stage's gradient flows back through the p2p backward into the
  student layer and the projection; or
* ``side="t"``: the teacher's state, detached (the teacher is never trained).

On stage ``k`` a slot is *sent* (``k == src``: the captured state goes in), *passed* on
(``src < k < dst``: the received channels go out unchanged), *used* (``k == dst``: the loss is
computed from the received channels), or is *idle* (zeros) elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass


def stage_of(layer: int, num_layers: int, pp: int) -> int:
    """Pipeline stage holding ``layer`` when ``num_layers`` are split evenly over ``pp`` stages."""
    return layer // (num_layers // pp)


@dataclass(frozen=True)
class Slot:
    pair: tuple[int, int]  # (student layer, teacher layer)
    side: str  # "s": the student's (projected) state travels; "t": the teacher's
    src: int  # stage that captures the earlier layer's output
    dst: int  # stage of the later layer, where the loss is computed

    def role(self, stage: int) -> str:
        """``send``, ``pass``, ``use`` or ``idle`` on ``stage``."""
        if stage == self.src:
            return "send"
        if self.src < stage < self.dst:
            return "pass"
        return "use" if stage == self.dst else "idle"


def plan_slots(pairs, student_layers: int, teacher_layers: int, pp: int) -> list[Slot]:
    """One slot per cross-stage pair, in ``pairs`` order (the same list on every rank)."""
    slots = []
    for s, t in pairs:
        ss, ts = stage_of(s, student_layers, pp), stage_of(t, teacher_layers, pp)
        if ss != ts:
            slots.append(Slot((s, t), "s" if ss < ts else "t", min(ss, ts), max(ss, ts)))
    return slots

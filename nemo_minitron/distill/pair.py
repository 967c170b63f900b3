"""Teacher and student in one pipeline: one module that megatron's schedules drive as a whole.

Both models have the same TP/PP layout, so pipeline stage k of the pair holds stage k of each.
Between stages the pair passes one tensor, ``cat([student_hidden, teacher_hidden], dim=-1)``
(the schedule sizes its p2p buffers from ``config.hidden_size``, which is set to the sum); the
last stage returns both models' logits, or with ``fused_output`` (kd.fused_output) their final
hidden states and output weights as :class:`~..runtime.selected_logits.OutputHidden`, which the
logit loss multiplies chunk by chunk. The teacher runs under ``no_grad`` in eval mode, so
backward only reaches the student and the teacher's slice of every received gradient is zero.

With intermediate losses (:mod:`.intermediate`) each stage also computes the hidden-state losses
whose later layer it holds: the last stage returns them as a third output for the loss function,
the others attach their gradient to the tensor they send on. A pair split over two stages carries
its earlier state down the pipeline as extra channels after the two hidden states (:mod:`.carry`),
so the p2p tensor is ``cat([student_hidden, teacher_hidden, slots...], dim=-1)`` on every stage.
"""

from __future__ import annotations

import contextlib
import copy

import torch


class DistillPair(torch.nn.Module):
    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module | None,
                 student_hidden: int, teacher_hidden: int, student_config, intermediate=None,
                 fused_output: bool = False):
        super().__init__()
        # the last stage hands both models' final hidden states and output weights to the loss
        # (kd.fused_output), which applies the output layers chunk by chunk
        self.fused_output = fused_output and teacher is not None
        self.intermediate = intermediate  # IntermediateLosses of this stage, or None
        self.module = student  # DDP-wrapped student: what get_attr_wrapped_model unwraps to
        self.teacher = teacher
        self.hs, self.ht = student_hidden, teacher_hidden if teacher is not None else 0
        self.config = copy.copy(student_config)
        with_carry = intermediate is not None and teacher is not None
        self.carry = intermediate.carry_width if with_carry else 0  # channels of carried states
        self.config.hidden_size = self.hs + self.ht + self.carry
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    def _unwrapped_student(self):
        m = self.module
        while hasattr(m, "module"):
            m = m.module
        return m

    def set_input_tensor(self, input_tensor) -> None:
        t = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
        student = self._unwrapped_student()
        if t is None or self.teacher is None:
            student.set_input_tensor(t)
            if self.teacher is not None:
                self.teacher.set_input_tensor(None)
            if self.intermediate is not None:
                self.intermediate.receive(None)
            return
        student.set_input_tensor(t[..., : self.hs])
        self.teacher.set_input_tensor(t[..., self.hs: self.hs + self.ht].detach())
        if self.intermediate is not None:  # the carried slots (a student slot keeps its graph)
            self.intermediate.receive(t[..., self.hs + self.ht:] if self.carry else None)

    def forward(self, tokens, position_ids, attention_mask=None, loss_mask=None):
        inter = self.intermediate if self.teacher is not None else None
        gpt = self._unwrapped_student()
        last = gpt.post_process
        fuse = self.fused_output and last
        with inter.capturing() if inter is not None else contextlib.nullcontext(), \
                _final_hidden(gpt, fuse) as s_sel, \
                _final_hidden(self.teacher, fuse) as t_sel:
            student_out = self.module(tokens, position_ids, attention_mask)
            if self.teacher is None:
                return student_out
            with torch.no_grad():
                teacher_out = self.teacher(tokens, position_ids, attention_mask)
        extra = inter.local_loss(loss_mask) if inter is not None else None
        carry = inter.carry_out(student_out) if inter is not None else None
        if last:
            if fuse:
                student_out, teacher_out = _both_or_logits(student_out, s_sel, teacher_out, t_sel)
            return student_out, teacher_out, extra
        if extra is not None:  # no loss function on this stage: the gradient rides on the output
            student_out = inter.attach(student_out, extra, self.config, loss_mask)
        parts = [student_out, teacher_out.to(student_out.dtype)]
        return torch.cat(parts + ([carry] if carry is not None else []), dim=-1)


def _final_hidden(model, on: bool):
    from ..runtime.selected_logits import final_hidden
    return final_hidden(model) if on and model is not None else contextlib.nullcontext()


def _both_or_logits(student_out, s_sel, teacher_out, t_sel):
    """Both outputs as :class:`OutputHidden` where both output layers were bypassed; else both
    as logits (a model whose output layer could not be bypassed keeps its logits)."""
    from ..runtime.selected_logits import OutputHidden, hidden_or_logits

    s, t = hidden_or_logits(student_out, s_sel), hidden_or_logits(teacher_out, t_sel)
    if isinstance(s, OutputHidden) and isinstance(t, OutputHidden):
        return s, t
    if isinstance(s, OutputHidden):
        s = s.logits()
    if isinstance(t, OutputHidden):
        with torch.no_grad():
            t = t.logits()
    return s, t

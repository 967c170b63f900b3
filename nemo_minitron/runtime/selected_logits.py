"""Logits only where a scorer reads them.

Multiple-choice scoring reads a few continuation positions per row, yet the model's output layer
computes [b, s, vocab] logits at every position and megatron then transposes them to [b, s, v].
On SmolLM2 (vocab 49152, hidden 576) that output layer is about a fifth of the teacher's forward
FLOPs and a third of an 89M student's. Inside :func:`final_hidden` the last stage's output layer
returns its input instead, so the model hands back its final (normed) hidden states [b, s, h];
:func:`logits_at` then applies the output weight to the selected rows only: this tensor-parallel
rank's vocabulary slice, as the output layer itself would (it never gathers in these forwards).

Anything the shortcut would not reproduce exactly keeps the full output layer: sequence
parallelism (the layer all-gathers its input first), a gathering or biased output layer,
multi-token prediction (which calls the output layer itself).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def _can_skip(gpt) -> bool:
    layer = getattr(gpt, "output_layer", None)
    return (layer is not None and getattr(gpt, "post_process", False)
            and not getattr(layer, "sequence_parallel", False)
            and not getattr(layer, "gather_output", False)
            and getattr(layer, "bias", None) is None
            and not getattr(gpt, "mtp_process", False))


class Selected:
    """What :func:`final_hidden` yields: ``weight`` is the output weight the last forward used."""

    def __init__(self):
        self.weight: torch.Tensor | None = None

    def logits_at(self, out: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [n, V/tp] at (rows[i], pos[i]) of a forward's output ``out`` ([b, s, h] hidden
        states inside :func:`final_hidden`, else already [b, s, V/tp] logits)."""
        picked = out[rows, pos]
        if self.weight is None:
            return picked
        # a wrapper may hand the hidden states back upcast (megatron's Float16Module does)
        return F.linear(picked.to(self.weight.dtype), self.weight)


class OutputHidden:
    """A last stage's output under :func:`final_hidden` when the output layer was bypassed:
    ``states`` [b, s, h] (the output layer's input, possibly upcast by a wrapper) and the
    ``weight`` [V/tp, h] the layer would have applied."""

    def __init__(self, states: torch.Tensor, weight: torch.Tensor):
        self.states, self.weight = states, weight

    @property
    def hidden(self) -> torch.Tensor:
        """``states`` in the weight's dtype, as the output layer would read them."""
        return self.states.to(self.weight.dtype)

    def logits(self) -> torch.Tensor:
        """The [b, s, V/tp] logits the output layer would have returned (no gather)."""
        return F.linear(self.hidden, self.weight)


def hidden_or_logits(out: torch.Tensor, sel: Selected):
    """``out`` of a forward under :func:`final_hidden` as an :class:`OutputHidden` where the
    output layer was bypassed, else as the logits it already is."""
    return out if sel.weight is None else OutputHidden(out, sel.weight)


@contextlib.contextmanager
def final_hidden(model: torch.nn.Module):
    """While active, ``model`` (a megatron GPTModel, possibly wrapped) returns final hidden states
    instead of logits on the last stage; yields a :class:`Selected` that turns selected positions
    into logits. Where the shortcut does not apply, the model is left alone and the yielded
    object passes logits through."""
    from megatron.core.utils import unwrap_model  # DDP, FSDP, Float16Module

    sel = Selected()
    gpt = unwrap_model(model)
    if not _can_skip(gpt):
        yield sel
        return
    layer = gpt.output_layer

    def forward(hidden_states, weight=None, runtime_gather_output=None):
        sel.weight = layer.weight if weight is None else weight
        return hidden_states, None

    layer.forward = forward  # an instance attribute: nn.Module.__call__ looks it up first
    try:
        yield sel
    finally:
        del layer.forward

"""Structured pruning, plan then apply: :mod:`.plan` decides what to keep, :mod:`.apply` slices."""

"""Typed config schemas for every stage, registered in Hydra's ConfigStore (see :mod:`.schema`)."""

from .schema import register  # noqa: F401

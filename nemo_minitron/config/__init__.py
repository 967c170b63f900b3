"""Typed config schemas for every stage (:mod:`.schema`), the prune-target group (:mod:`.targets`)
and the closed vocabularies they check (:mod:`.constants`); the bottom layer of the package."""

"""Command line: `minitron <stage> [hydra overrides]`, one thin Hydra app per stage."""

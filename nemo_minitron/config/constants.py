"""The closed vocabularies and defaults that the schema checks and lower-level code implements.

They live here, below everything, so that the schema validates a job without importing the
packages that implement the choices (evaluation, importance scoring, asset fetching): each of
those imports its table from here instead.
"""

from __future__ import annotations

import os
from pathlib import Path

TASK_NAMES = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "mmlu",
              "openbookqa", "sciq")
"""Built-in multiple-choice tasks (:data:`nemo_minitron.evaluate.tasks.TASKS` defines each)."""

SEQUENCE_AGGS = ("mean_abs", "mean", "l2", "var")
"""Reductions of an activation over the sequence (``importance.scores.sequence_aggregate``)."""
BATCH_AGGS = ("l2", "mean", "var")
"""Reductions of per-sample values over samples (``importance.scores.batch_aggregate``)."""

CACHE_ENV = "NEMO_MINITRON_CACHE"


def cache_dir() -> Path:
    """Where assets and the demo run's derived files live: ``$NEMO_MINITRON_CACHE`` or
    ``~/.cache/nemo_minitron`` (the ``${cache:...}`` resolver of the YAML configs)."""
    env = os.environ.get(CACHE_ENV)
    if env and Path(env).expanduser().is_file():  # else every asset reads as "not installed"
        raise ValueError(f"{CACHE_ENV}={env} is a file; point it at a directory (or unset it "
                         "for ~/.cache/nemo_minitron)")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nemo_minitron"

"""The settings of a quick job on :func:`tests.helpers.corpus.tiny_workspace`: 32-token samples,
8 calibration samples, batches of 4 in micro-batches of 2, two evaluation batches."""

from __future__ import annotations

from pathlib import Path

from nemo_minitron.config.schema import (DataConfig, EvalConfig, KDConfig, ModelConfig,
                                         PruneConfig, TrainConfig)


def tiny_job_parts(tmp: Path, **train) -> dict:
    """model, data, prune, train, kd and eval of a job on ``tmp/teacher`` and ``tmp/corpus``;
    ``train`` sets or overrides TrainConfig fields (steps, intervals)."""
    return dict(
        model=ModelConfig(name="tiny", checkpoint=str(tmp / "teacher")),
        data=DataConfig(prefix=str(tmp / "corpus"), seq_length=32, valid_fraction=0.1),
        prune=PruneConfig(calib_samples=8, micro_batch_size=2),
        train=TrainConfig(**{**dict(global_batch_size=4, micro_batch_size=2, lr=1e-3,
                                    warmup_steps=1, eval_interval=0, eval_batches=2,
                                    tensorboard=False), **train}),
        kd=KDConfig(chunk_tokens=16), eval=EvalConfig(micro_batch_size=2, num_batches=2))

"""Where a training run's metrics go: metrics.jsonl (the record resume and reports read), a
progress line on rank 0, and TensorBoard / W&B when available."""

from __future__ import annotations

import logging
from pathlib import Path

from ..artifacts.metrics import METRICS, append_metrics

log = logging.getLogger(__name__)

LINE_KEYS = ("loss", "kd", "lm", "hidden", "emb", "val_loss", "moe_max_load", "moe_aux_loss")


def progress_line(step: int, steps: int, metrics: dict, tokens_per_s: float, eta_s: float) -> str:
    """The one-line summary of a logged step."""
    parts = [f"step {step}/{steps}"] + (["skipped"] if "nonfinite" in metrics else [])
    parts += [f"{k} {metrics[k]:.4f}" for k in LINE_KEYS if k in metrics]
    parts += [f"lr {metrics['lr']:.2e}", f"{tokens_per_s:.0f} tok/s", f"eta {eta_s:.0f}s"]
    return " | ".join(parts)


class Logger:
    """One line per interval on rank 0, metrics.jsonl, and TensorBoard / W&B when available."""

    def __init__(self, run_dir: Path, tensorboard: bool, wandb_project: str | None, config: dict,
                 on: bool = True):
        self.on = on  # rank 0 writes; the other ranks hold a logger that does nothing
        self.file = open(run_dir / METRICS, "a") if self.on else None
        self.tb = self.wb = None
        if self.on and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                log.info("tensorboard not installed: scalars go to metrics.jsonl only")
        if self.on and wandb_project:
            import wandb

            self.wb = wandb.init(project=wandb_project, config=config, dir=str(run_dir))

    def write(self, step: int, metrics: dict) -> None:
        if not self.on:
            return
        append_metrics(self.file, step, metrics)
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                if self.tb:
                    self.tb.add_scalar(k, v, step)
        if self.wb:
            self.wb.log(metrics, step=step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
        if self.wb:
            self.wb.finish()

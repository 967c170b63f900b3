"""The training logger's TensorBoard scalars (train.tensorboard defaults to on, and tensorboard is
installed with the package): what metrics.jsonl records, TensorBoard reads back."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nemo_minitron.distill.logger import Logger

from tests.helpers import metrics


def test_scalars_match_metrics_jsonl(tmp_path):
    logger = Logger(tmp_path, tensorboard=True, wandb_project=None, config={})
    assert logger.tb is not None, "tensorboard should be installed with the package"
    for step in (1, 2, 3):
        logger.write(step, {"loss": 5.0 - step, "lr": 1e-3 * step, "skipped": False})
    logger.write(3, {"val_loss": 2.5})
    logger.close()
    rows = metrics(tmp_path)
    ev = EventAccumulator(str(tmp_path / "tb"))
    ev.Reload()
    assert {"loss", "lr", "val_loss"} <= set(ev.Tags()["scalars"])
    assert [(e.step, e.value) for e in ev.Scalars("loss")] == \
        [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [(e.step, e.value) for e in ev.Scalars("val_loss")] == [(3, 2.5)]

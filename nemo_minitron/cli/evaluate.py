"""`minitron evaluate`: validation loss and perplexity of a checkpoint, at any TP/PP/DP layout."""

import json
import logging
import time
from pathlib import Path

from .main import hydra_app

log = logging.getLogger(__name__)


def run(job) -> dict:
    from megatron.core import parallel_state as ps

    from ..convert.checkpoint import Checkpoint
    from ..data.packed import PackedSequences
    from ..evaluate.loss import validation_loss
    from ..runtime import dist
    from ..runtime.stage import load_checkpoint

    Checkpoint(job.model.checkpoint).arch.check_parallel(job.parallel.tp, job.parallel.pp)
    data = PackedSequences(job.data.prefix, job.data.seq_length, split="valid",
                           valid_fraction=job.data.valid_fraction, seed=job.parallel.seed)
    dist.init(job.parallel.tp, job.parallel.pp, job.parallel.seed, job.parallel.timeout_s)
    try:
        t0 = time.time()
        stage, _ = load_checkpoint(job.model.checkpoint, job.model.dtype)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        full = len(data) // (job.eval.micro_batch_size * dp)
        n = full if job.eval.num_batches is None else min(job.eval.num_batches, full)
        if n < 1:
            raise ValueError(f"held-out split has {len(data)} samples of {job.data.seq_length} "
                             f"tokens, fewer than one global batch of "
                             f"{job.eval.micro_batch_size * dp}; lower eval.micro_batch_size or "
                             "data.seq_length")
        batches = data.batches(job.eval.micro_batch_size, num_batches=n, dp_rank=dp_rank,
                               dp_size=dp)
        result = validation_loss(stage, batches, progress="evaluate")
        result.update(checkpoint=str(job.model.checkpoint), data=job.data.prefix,
                      seq_length=job.data.seq_length, layout={"tp": job.parallel.tp,
                      "pp": job.parallel.pp, "dp": dp}, seconds=round(time.time() - t0, 2))
        if dist.is_rank0():
            log.info("validation loss %.4f | perplexity %.2f | %d tokens | %.1f s",
                     result["loss"], result["perplexity"], result["tokens"], result["seconds"])
            out = Path(job.output) if job.output else _run_dir() / "eval_results.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2))
            log.info("results: %s", out)
        return result
    finally:
        dist.release()


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path(".")


def main():
    return hydra_app("evaluate", run)

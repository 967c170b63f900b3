"""Plumbing the tests share: launching the CLI and torchrun workers (``proc``), reading what runs
write (``metrics``), and the tiny models, corpora and jobs the tests run on (``models``,
``corpus``, ``jobs``). Assertions stay in the tests."""

from tests.helpers.corpus import tiny_corpus, tiny_workspace
from tests.helpers.metrics import metrics, read_jsonl, series
from tests.helpers.models import batch, canonical_state, exported, tiny_hf, tiny_tokenizer
from tests.helpers.proc import ROOT, WORKERS, child_env, minitron, minitron_popen, run, torchrun

__all__ = ["ROOT", "WORKERS", "batch", "canonical_state", "child_env", "exported", "metrics",
           "minitron", "minitron_popen", "read_jsonl", "run", "series", "tiny_corpus", "tiny_hf",
           "tiny_tokenizer", "tiny_workspace", "torchrun"]

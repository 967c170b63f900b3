"""Tiny indexed corpora of the word-level tokenizer's words, and a teacher + corpus directory."""

from __future__ import annotations

import random
from pathlib import Path

from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.data.indexed import build_indexed

from tests.helpers.models import tiny_hf, tiny_tokenizer


def tiny_corpus(prefix, n_docs: int = 40, seed: int = 0, words: int = 998) -> None:
    """``n_docs`` documents of 20-79 random words among the first ``words`` of the tiny
    tokenizer's vocabulary (all of it by default), tokenised and indexed at ``prefix``."""
    rnd = random.Random(seed)
    docs = [" ".join(f"w{rnd.randrange(2, 2 + words)}" for _ in range(rnd.randrange(20, 80)))
            for _ in range(n_docs)]
    build_indexed(docs, tiny_tokenizer(), prefix, progress=False)


def tiny_workspace(tmp: Path, n_docs: int = 50) -> Path:
    """``tmp/teacher``: a tiny GQA checkpoint (with tokenizer); ``tmp/corpus``: a tiny corpus."""
    hf = tiny_hf("gqa")
    ckpt.save(tmp / "teacher", arch_from_hf_config(hf.config), hf.state_dict(),
              tokenizer=tiny_tokenizer())
    tiny_corpus(tmp / "corpus", n_docs=n_docs)
    return tmp

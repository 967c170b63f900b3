"""Offline teacher cache: the teacher's top-k log-probabilities of every token a distillation reads.

The teacher forward is a large share of a distillation step, and search candidates, re-runs and
ablations all recompute it on the same tokens. ``minitron teacher_cache`` runs the teacher once over
the token stream a distillation with the same data, seq length, seed and global batch reads (the
samples come from :func:`~nemo_minitron.data.packed.step_batches`, the training loop's own
reader) and stores, per token, :func:`~nemo_minitron.distill.losses.teacher_topk`: the k largest
log-probabilities at ``kd.temperature``, their vocabulary ids and the log of the remaining mass.

Layout of a cache directory (safetensors and JSON only; nothing is unpickled)::

    manifest.json                  what the cache is of (teacher/tokenizer/data fingerprints, seq
                                   length, k, temperature, seed, global batch, steps, dtype,
                                   ids_dtype)
    step_0000000.safetensors ...   one shard per training step: sample [G] int64 (packed sample
                                   numbers), ids [G, L, k] uint16 or int32, logp [G, L, k],
                                   log_rest [G, L]

Ids are stored as uint16 when the vocabulary fits (at most 65536 ids: SmolLM2, Llama 2, Mistral),
else int32: ``4k + 2`` instead of ``6k + 2`` bytes per token at fp16. Caches written before the
manifest named ``ids_dtype`` hold int32 ids; the reader takes either and hands the loss int32.

The build runs at any TP/PP/DP layout and writes the same files as a one-process build (the top-k
merged from the TP shards' candidates, the DP replicas' rows gathered for one writer). Shards are
written atomically (temporary name, then rename), so an interrupted build resumes at the first
missing shard, at any layout. Readers look samples up by number, so any micro-batch size and data-
parallel split of the same global batches finds its rows; a sample read again in a later epoch is
served from its first shard.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..artifacts.atomic import write_file, write_text
from ..convert import checkpoint as ckpt
from ..convert.fingerprint import checkpoint_fingerprint, tokenizer_fingerprint
from ..data.indexed import data_fingerprint
from ..data.packed import PackedSequences, step_batches
from ..runtime import dist
from ..runtime.collectives import all_gather_cat
from ..runtime.forward import on_device, run_forward
from ..runtime.shard import load_checkpoint
from .losses import teacher_topk

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "nemo_minitron.teacher_cache/1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ID_DTYPES = {"uint16": torch.uint16, "int32": torch.int32}
# fields a distillation must agree on with the cache (the data order and what the tokens are)
SHARD_TENSORS = ("sample", "ids", "logp", "log_rest")
# every manifest field but ids_dtype (older caches stored int32 ids without naming them)
REQUIRED = ("teacher", "teacher_fingerprint", "tokenizer_fingerprint", "vocab_size", "data",
            "seq_length", "valid_fraction", "seed", "global_batch_size", "steps", "temperature",
            "k", "dtype")
RUN_FIELDS = ("teacher_fingerprint", "data", "seq_length", "valid_fraction", "seed",
              "global_batch_size", "temperature")


def shard_name(step: int) -> str:
    return f"step_{step:07d}.safetensors"


def ids_dtype(vocab_size: int) -> str:
    """The narrowest stored id type that holds ids ``0 .. vocab_size - 1``."""
    return "uint16" if vocab_size <= 65536 else "int32"


def describe(teacher: str, data, train, temperature: float, k: int, dtype: str,
             vocab_size: int) -> dict:
    """The manifest of a cache of ``teacher`` for a run with these data/train settings."""
    return {"format": FORMAT, "teacher": str(Path(teacher).resolve()),
            "teacher_fingerprint": checkpoint_fingerprint(teacher),
            "tokenizer_fingerprint": tokenizer_fingerprint(teacher), "vocab_size": vocab_size,
            "data": data_fingerprint(data.prefix), "seq_length": data.seq_length,
            "valid_fraction": data.valid_fraction, "seed": train.seed,
            "global_batch_size": train.global_batch_size, "steps": train.steps,
            "temperature": float(temperature), "k": k, "dtype": dtype,
            "ids_dtype": ids_dtype(vocab_size)}


def bytes_per_token(k: int, dtype: str, ids: str = "int32") -> int:
    """Stored bytes per token: k ids of type ``ids``, k log-probabilities and one log-rest in
    ``dtype``."""
    item = DTYPES[dtype].itemsize
    return k * (ID_DTYPES[ids].itemsize + item) + item


def read_manifest(path) -> dict:
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise ValueError(f"kd.teacher_cache={path}: no {MANIFEST}; build the cache with "
                         "`minitron teacher_cache` (same data, train and kd settings) first")
    m = ckpt.read_json(f)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise ValueError(f"{f} has format {got!r}, expected {FORMAT!r}")
    lost = [k for k in REQUIRED if k not in m]
    if lost:
        raise ValueError(f"{f} lacks {', '.join(lost)}: a damaged manifest; rebuild the cache "
                         "with `minitron teacher_cache ... overwrite=true`")
    return m


def shard_ok(f: Path) -> bool:
    """The shard is there and whole: its header reads and covers the file (safetensors checks
    the sizes), with the four tensors a step holds. Shards are written atomically, so a bad one
    was damaged afterwards (a cut copy, a full disk)."""
    if not f.is_file():
        return False
    try:
        with safe_open(str(f), "pt") as h:
            return set(SHARD_TENSORS) <= set(h.keys())
    except Exception:  # safetensors' own error type, OSError: unreadable either way
        return False


def check_run(path, *, teacher: str | None, student: str, data, train, kd) -> dict:
    """Refuse a distillation the cache at ``path`` does not cover, naming the field; reads only
    small files (manifest, headers, .idx). Returns the manifest."""
    m = read_manifest(path)
    where = f"kd.teacher_cache={path}"
    if kd.kind != "forward":
        raise ValueError(f"kd.kind={kd.kind}: a teacher cache gives forward KL only; set "
                         "kd.kind=forward or drop kd.teacher_cache")
    if kd.hidden_pairs or kd.auto_hidden_pairs or kd.embedding_weight:
        raise ValueError("kd.hidden_pairs / kd.auto_hidden_pairs / kd.embedding_weight need the "
                         "live teacher's hidden states, which a teacher cache does not hold: drop "
                         "them or drop kd.teacher_cache")
    if kd.top_k is not None and kd.top_k > m["k"]:
        raise ValueError(f"kd.top_k={kd.top_k} is more than the {m['k']} ids per token {where} "
                         f"holds; set kd.top_k<={m['k']} or build a cache with cache.k={kd.top_k}")
    if teacher and Path(teacher).is_dir() and checkpoint_fingerprint(teacher) != m["teacher_fingerprint"]:
        raise ValueError(f"kd.teacher={teacher} is not the teacher {where} was built from "
                         f"({m['teacher']}); point kd.teacher at that one or rebuild the cache")
    s_arch = ckpt.Checkpoint(student).arch
    if s_arch.vocab_size != m["vocab_size"]:
        raise ValueError(f"model.checkpoint={student} has a vocabulary of {s_arch.vocab_size}, "
                         f"the cached teacher {m['vocab_size']}: they need the same tokenizer")
    tok = tokenizer_fingerprint(student)
    if tok and m["tokenizer_fingerprint"] and tok != m["tokenizer_fingerprint"]:
        raise ValueError(f"model.checkpoint={student}/tokenizer differs from the tokenizer of "
                         f"the teacher {where} was built from: they need the same tokenizer")
    want = {"data": data_fingerprint(data.prefix), "seq_length": data.seq_length,
            "valid_fraction": data.valid_fraction, "seed": train.seed,
            "global_batch_size": train.global_batch_size, "temperature": float(kd.temperature)}
    names = {"data": "data.prefix", "seq_length": "data.seq_length",
             "valid_fraction": "data.valid_fraction", "seed": "train.seed",
             "global_batch_size": "train.global_batch_size", "temperature": "kd.temperature"}
    for key, value in want.items():
        if m[key] == value:
            continue
        if key == "data":  # same path, other content (rebuilt or appended) is named as such
            raise ValueError(f"data.prefix={data.prefix} is not the dataset {where} was built "
                             f"from ({m['data']['prefix']}, .idx sha256 {m['data']['idx_sha256'][:12]}, "
                             f".bin {m['data']['bin_bytes']} bytes); use that one or rebuild the cache")
        raise ValueError(f"{names[key]}={value} differs from the {m[key]} {where} was built for; "
                         "use the cache's value or rebuild the cache")
    if train.steps > m["steps"]:
        raise ValueError(f"train.steps={train.steps} is more than the {m['steps']} steps {where} "
                         "covers; lower train.steps or rebuild the cache with more steps")
    missing = [shard_name(s) for s in range(train.steps) if not shard_ok(Path(path) / shard_name(s))]
    if missing:
        raise ValueError(f"{where} lacks {missing[0]} (and {len(missing) - 1} more shards) or "
                         "holds a damaged copy: the build was interrupted or a file was cut; run "
                         "`minitron teacher_cache` again to write them")
    return m


class TeacherCache:
    """Read side: the cached top-k of given sample numbers (shards opened lazily, memory-mapped)."""

    def __init__(self, path, steps: int, top_k: int | None = None):
        self._open = safe_open
        self.path = Path(path)
        self.manifest = read_manifest(path)
        self.top_k = top_k
        self._handles: dict[int, object] = {}  # a few open shards (a long run has thousands)
        self._where: dict[int, tuple[int, int]] = {}
        for step in range(steps):  # first occurrence wins (later epochs repeat samples)
            with safe_open(str(self.path / shard_name(step)), "pt") as h:
                for row, sample in enumerate(h.get_tensor("sample").tolist()):
                    self._where.setdefault(sample, (step, row))

    def _shard(self, step: int):
        if step not in self._handles:
            if len(self._handles) >= 8:  # the oldest goes: a step reads one or two shards
                self._handles.pop(next(iter(self._handles)))
            self._handles[step] = self._open(str(self.path / shard_name(step)), "pt")
        return self._handles[step]

    def lookup(self, samples: torch.Tensor) -> dict[str, torch.Tensor]:
        """``cache_ids/cache_logp/cache_rest`` of these samples, stacked ``[b, L, k]`` / ``[b, L]``."""
        rows = {"ids": [], "logp": [], "log_rest": []}
        for sample in samples.tolist():
            if sample not in self._where:
                raise ValueError(f"sample {sample} is not in the teacher cache {self.path}: the run "
                                 "reads other data than the cache was built for")
            f, row = self._where[sample]
            for name in rows:
                rows[name].append(self._shard(f).get_slice(name)[row])
        ids, logp, rest = (torch.stack(rows[n]) for n in ("ids", "logp", "log_rest"))
        ids = ids.to(torch.int32)  # uint16 or (older caches) int32 on disk: one type for the loss
        if self.top_k is not None and self.top_k < ids.shape[-1]:  # fold the dropped ids into
            k = self.top_k  # the rest bucket: log(rest + sum of their probabilities)
            rest = torch.logsumexp(torch.cat([rest.float().unsqueeze(-1), logp[..., k:].float()], -1), -1)
            ids, logp = ids[..., :k], logp[..., :k]
        return {"cache_ids": ids, "cache_logp": logp, "cache_rest": rest}


def other_settings(have: dict, want: dict) -> str | None:
    """The first manifest field in which ``have`` differs from ``want``, as ``field: have vs
    want``; None when it is a cache of the same settings. ``steps`` (a cache may grow) and
    ``ids_dtype`` (how ids are stored, not what they are) are left out."""
    for key in sorted(set(have) | set(want)):
        if key not in ("steps", "ids_dtype") and have.get(key) != want.get(key):
            return f"{key}: {have.get(key)} vs {want.get(key)}"
    return None


def complete(path, steps: int) -> bool:
    """A manifest and the shards of steps 0..steps-1 are all in ``path``."""
    p = Path(path)
    return (p / MANIFEST).is_file() and all(shard_ok(p / shard_name(s)) for s in range(steps))


def check_output(out: Path, manifest: dict, overwrite: bool, field: str = "output",
                 fix: str = "pass overwrite=true to replace it") -> None:
    """Refuse an output holding something else than (part of) this cache; reads only."""
    old = out / MANIFEST
    if old.is_file() and not overwrite:
        differs = other_settings(ckpt.read_json(old), manifest)
        if differs:
            raise FileExistsError(f"{field}={out} holds a teacher cache of other settings "
                                  f"({differs}); choose another directory or {fix}")
    elif out.exists() and any(out.iterdir()) and not old.is_file() and not overwrite:
        raise FileExistsError(f"{field}={out} already exists, is not empty and holds no teacher "
                              f"cache; choose another directory or {fix}")


def _start_output(out: Path, manifest: dict, overwrite: bool) -> None:
    """Rank 0: clear a replaced cache and write the manifest (before any shard)."""
    if overwrite and out.is_dir():
        for f in list(out.glob("step_*.safetensors")) + [out / MANIFEST]:
            f.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / MANIFEST, json.dumps(manifest, indent=2))


def _resumed_manifest(out: Path, manifest: dict, overwrite: bool) -> dict:
    """``manifest``, keeping the id type of a cache being resumed (one written before uint16 ids
    holds int32 ids: its new shards must match)."""
    old = out / MANIFEST
    if overwrite or not old.is_file():
        return manifest
    return dict(manifest, ids_dtype=ckpt.read_json(old).get("ids_dtype", "int32"))


def _step_rows(outs: list[dict], par, ids_dtype: torch.dtype) -> dict | None:
    """The whole global batch's rows on the writer (last pipeline stage, TP rank 0, DP rank 0),
    None elsewhere: each DP replica's rows are all-gathered over the data-parallel group of the
    last stage's TP rank 0 (all TP ranks hold the same top-k). Ids are narrowed to the stored
    type only here (gloo gathers no uint16)."""
    if not (par.last_stage and par.tp_rank == 0):
        return None
    rows = {n: torch.cat([o[n] for o in outs]) for n in ("sample", "ids", "logp", "log_rest")}
    if par.dp > 1:
        rows = {n: all_gather_cat(t.contiguous(), par.dp_group) for n, t in rows.items()}
    if par.dp_rank != 0:
        return None
    rows["ids"] = rows["ids"].to(ids_dtype)
    return {n: t.cpu().contiguous() for n, t in rows.items()}


def _log_size(tr, data, c, ids: str) -> int:
    tokens = tr.steps * tr.global_batch_size * data.seq_length
    per = bytes_per_token(c.k, c.dtype, ids)
    log.info("teacher cache: %d steps x %d samples x %d tokens = %d tokens, k=%d %s: %d bytes/token, "
             "about %.1f MB", tr.steps, tr.global_batch_size, data.seq_length, tokens, c.k, c.dtype,
             per, tokens * per / 1e6)
    return tokens


def build(job) -> dict:
    """Run the teacher over the run's samples step by step at ``job.parallel``'s layout; write
    the missing shards (resumable). Every DP replica runs its share of each global batch (the
    samples a distillation's DP rank reads); the last stage computes the top-k per TP vocabulary
    shard and one rank writes the step's shard."""
    kd, tr, data, c = job.kd, job.train, job.data, job.cache
    out = Path(job.output)
    teacher_arch = ckpt.Checkpoint(kd.teacher).arch
    manifest = describe(kd.teacher, data, tr, kd.temperature, c.k, c.dtype, teacher_arch.vocab_size)
    check_output(out, manifest, job.overwrite)
    manifest = _resumed_manifest(out, manifest, job.overwrite)
    tokens = _log_size(tr, data, c, manifest["ids_dtype"])
    train_data = PackedSequences(data.prefix, data.seq_length, split="train",
                                 valid_fraction=data.valid_fraction, seed=tr.seed)
    par = dist.init(job.parallel.tp, job.parallel.pp, job.parallel.seed, job.parallel.timeout_s)
    try:
        if par.is_rank0:
            _start_output(out, manifest, job.overwrite)
        todo = dist.broadcast_from_rank0(
            [s for s in range(tr.steps) if not shard_ok(out / shard_name(s))])
        if len(todo) < tr.steps:
            log.info("resuming: %d of %d shards already written", tr.steps - len(todo), tr.steps)
        teacher, _ = load_checkpoint(kd.teacher, job.model.dtype)
        dtype = DTYPES[c.dtype]

        def on_logits(logits, batch):
            ids, logp, rest = teacher_topk(logits, c.k, temperature=kd.temperature,
                                           vocab_size=teacher_arch.vocab_size,
                                           tp_group=par.tp_group)
            return {"sample": batch["sample"], "ids": ids, "logp": logp.to(dtype),
                    "log_rest": rest.to(dtype)}

        for s in par.progress(todo, desc="teacher cache", unit="step"):
            batches = step_batches(train_data, s, tr.global_batch_size, tr.micro_batch_size,
                                   seed=tr.seed, dp_rank=par.dp_rank, dp_size=par.dp,
                                   with_index=True)
            rows = _step_rows(run_forward(teacher, [on_device(b) for b in batches], on_logits),
                              par, ID_DTYPES[manifest["ids_dtype"]])
            if rows is not None:
                write_file(out / shard_name(s), lambda tmp: save_file(rows, str(tmp)))
        dist.barrier()  # every shard is on disk before any rank reports the size
    finally:
        dist.release()
    size = sum(f.stat().st_size for f in out.glob("step_*.safetensors"))
    result = {"output": str(out), "tokens": tokens, "bytes": size,
              "bytes_per_token": size / max(tokens, 1)}
    log.info("teacher cache written to %s: %.1f MB, %.1f bytes/token", out, size / 1e6,
             result["bytes_per_token"])
    return result

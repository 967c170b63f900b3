"""Pre-flight checks: one function per stage, run after the config is validated and before any
model is built or any output is written.

They read only small files — ``arch.json``, ``plan.json``, safetensors headers, dataset indices, the
importance scores — so a request that would fail after hours (a prune target the second round
cannot reach, a truncated shard, a dataset too small for one batch) fails in a second, with one
line naming the field or file and the fix. The stages keep their own checks; these only move the
verdict to the front. ``check(stage, job)`` dispatches; the CLI calls it for every stage.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from .arch import Arch, check_layout
from .artifacts import atomic
from .artifacts.search_files import CHOSEN, read_chosen
from .config.schema import RoundConfig
from .convert import checkpoint as ckpt
from .convert.fingerprint import tokenizer_fingerprint
from .convert.hf import resolve_source
from .convert import hf_checks
from .convert.megatron_dist import is_megatron_checkpoint
from .data.indexed import load_metadata, open_indexed
from .data.packed import PackedSequences
from .data.compressed import check_readable
from .data.sources import expand_paths
from .distill.intermediate import check_pairs
from .distill.layer_map import auto_pairs
from .distill.losses import check_vocab
from .distill.teacher_cache import check_run
from .distill import train_state
from .distill.trainer import check_aux_loss
from .evaluate.run import check_evaluate
from .evaluate.tasks import TASKS, load_task
from .families import export_family
from .importance.reduce import Importance
from . import assets, demo, recipe_record
from .runtime import dist
from .search import shared_cache
from .search.run import plan_candidates
from .search.space import describe_empty, enumerate_candidates, select

# huggingface_hub is imported where a hub name is checked against the local cache: it is heavy
# and local paths do not need it.


# ------------------------------------------------------------------ shared pieces
def checkpoint(path, field: str = "model.checkpoint") -> ckpt.Checkpoint:
    """The checkpoint at ``path``, its tensors' headers checked against its index and arch.json."""
    try:
        return ckpt.Checkpoint(path).verify()
    except ckpt.CheckpointError as e:
        raise ckpt.CheckpointError(f"{field}: {e}") from None


def data_parallel_size(parallel) -> int:
    """Data-parallel ranks of the launched job (the ranks that TP x PP leave)."""
    world, per = dist.launched_world_size(), parallel.tp * parallel.pp
    if world % per:
        raise ValueError(f"parallel.tp={parallel.tp} x parallel.pp={parallel.pp} does not divide "
                         f"the {world} launched ranks; launch a multiple of {per} ranks")
    return world // per


def split_samples(data, split: str) -> int:
    """Samples of ``data.seq_length`` tokens in one split (reads only the dataset index)."""
    try:
        return len(PackedSequences(data.prefix, data.seq_length, split=split,
                                   valid_fraction=data.valid_fraction))
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"data.prefix={data.prefix}: {e}") from None


def need_samples(data, split: str, need: int, what: str) -> None:
    have = split_samples(data, split)
    if have < need:
        raise ValueError(f"data.prefix={data.prefix}: the {split} split holds {have} samples of "
                         f"data.seq_length={data.seq_length} tokens, fewer than {what} ({need}); "
                         "lower it or data.seq_length, or use more data")


def not_inside(output, source, field: str = "output") -> None:
    """Writing ``output`` must not replace or nest in the checkpoint being read."""
    out, src = Path(output).expanduser().resolve(), Path(source).expanduser().resolve()
    if out == src or src in out.parents:
        raise ValueError(f"{field}={output} would write into the input checkpoint {source}; "
                         "choose another output directory")


def scores(path, arch: Arch, where: str = "") -> None:
    """``prune.scores`` holds importance of the shapes ``arch`` has (loaded as plain tensors)."""
    try:
        imp = Importance.load(path)
    except ValueError:
        raise  # names the field and the fix already
    except Exception as e:  # not a torch file, a pickle with code, missing keys
        raise ValueError(f"prune.scores={path} is not an importance file ({type(e).__name__}); "
                         "give the importance.safetensors an earlier `minitron prune` wrote") from None
    want = {"ffn": (arch.num_layers, arch.ffn_hidden_size),
            "heads": (arch.num_layers, arch.num_attention_heads),
            "hidden": (arch.hidden_size,), "block": (arch.num_layers,)}
    got = {k: tuple(getattr(imp, k).shape) for k in want}
    if got != want:
        raise ValueError(f"prune.scores={path} has shapes {got}, but the model{where} needs "
                         f"{want}: the scores belong to another model; calibrate again (unset "
                         "prune.scores)")


def keep_layers(layers, arch: Arch, where: str = "") -> None:
    if layers is not None and not all(0 <= i < arch.num_layers for i in layers):
        raise ValueError(f"prune.keep_layers={list(layers)} must lie in [0, {arch.num_layers}): "
                         f"the model{where} has {arch.num_layers} layers")


def resolve_targets(target, arch: Arch, tp: int, pp: int, field: str = "prune",
                    where: str = "") -> Arch:
    """The architecture ``target`` (the fields of ``field``.target) makes of ``arch``."""
    try:
        new = target.resolve(arch)
    except ValueError as e:
        raise ValueError(where + str(e).replace("prune.target.", f"{field}.target.")) from None
    try:
        new.check_parallel(tp, pp)
    except ValueError as e:  # names the pruned model's field: say where its value comes from
        raise ValueError(f"{where}{field}.target: the pruned model's {e}, or a target that it "
                         "divides") from None
    return new


def kd_pairs(kd, student_dir, teacher_dir, student: Arch, teacher: Arch) -> None:
    if kd.auto_hidden_pairs and student_dir is not None:
        auto_pairs(student_dir, teacher_dir, student.num_layers, teacher.num_layers)
    check_pairs([tuple(p) for p in kd.hidden_pairs], student.num_layers, teacher.num_layers)


def positions(arch: Arch, data, field: str = "model.checkpoint") -> None:
    """A sample fits the model's context: megatron's rotary embedding runs at any length, so
    longer samples train and evaluate at positions the model never saw, silently."""
    if data.seq_length > arch.max_position_embeddings:
        raise ValueError(f"data.seq_length={data.seq_length} exceeds the context of {field} "
                         f"(max_position_embeddings={arch.max_position_embeddings}); lower "
                         "data.seq_length")


def vocabulary(arch: Arch, data, field: str = "model.checkpoint", sample: int = 1 << 22) -> None:
    """The dataset's tokens fit the model's vocabulary (its first 4M tokens are read): a dataset
    made with another tokenizer ended in an IndexError in the embedding, the model built."""
    try:
        ds = open_indexed(data.prefix)
    except (ValueError, OSError) as e:
        raise ValueError(f"data.prefix={data.prefix}: {e}") from None
    dtype = np.dtype(ds.index.dtype)
    n = min(sample, Path(f"{data.prefix}.bin").stat().st_size // dtype.itemsize)
    if n == 0:  # no tokens: the split-size checks say so
        return
    top = int(np.memmap(f"{data.prefix}.bin", dtype=dtype, mode="r", shape=(n,)).max())
    if top >= arch.vocab_size:
        made = load_metadata(data.prefix).get("tokenizer")
        raise ValueError(f"data.prefix={data.prefix} holds token id {top}, outside the "
                         f"{arch.vocab_size}-token vocabulary of {field}: it was made with another "
                         f"tokenizer{f' ({made})' if made else ''}; rebuild it with `minitron data "
                         f"tokenizer=<{field}>`")


def train_sizes(job, dp: int) -> None:
    """Batches the training loop will ask for exist in the data (and divide over the ranks)."""
    tr = job.train
    if tr.global_batch_size % (tr.micro_batch_size * dp):
        raise ValueError(f"train.global_batch_size={tr.global_batch_size} is not divisible by "
                         f"train.micro_batch_size x data-parallel ranks = {tr.micro_batch_size} x "
                         f"{dp}; make it a multiple of {tr.micro_batch_size * dp}")
    need_samples(job.data, "train", tr.global_batch_size, "train.global_batch_size needs")
    need_samples(job.data, "valid", tr.micro_batch_size * dp,
                 "train.micro_batch_size x ranks needs")


def loggers(train) -> None:
    """train.wandb needs wandb: without it the run failed with a traceback once the model was
    built, its metrics.jsonl begun."""
    if train.wandb and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"train.wandb={train.wandb} needs wandb, which is not installed: "
                         "pip install wandb, or unset train.wandb (metrics.jsonl and TensorBoard "
                         "still log)")


def eval_inputs(job, dp: int, src: ckpt.Checkpoint | None = None) -> None:
    """The held-out split holds one evaluation batch, and every task's items load: a user's task
    file (``jsonl:``) read whole, every line an item; the installed data of the others, an MMLU
    subject named by ``mmlu_<subject>`` included (no model is needed to read them, and the
    stage reads them again from the same cache). A user's items are also tokenised with
    ``src``'s tokenizer, when it has one: a choice that tokenises to nothing cannot be scored."""
    need_samples(job.data, "valid", job.eval.micro_batch_size * dp,
                 "eval.micro_batch_size x ranks needs")
    tok = None  # loaded once, for the first user task
    for name in job.eval.tasks or ():
        try:
            items = load_task(name, job.eval.limit, job.eval.num_fewshot, job.eval.fewshot_seed)
        except (ValueError, OSError) as e:
            if name.startswith("jsonl:"):  # its messages name the file and line already
                raise
            raise type(e)(f"eval.tasks: {name}: {e}") from None  # (the CLI prints a cause)
        if name.startswith("jsonl:") and src is not None and src.has_tokenizer:
            tok = tok or src.tokenizer()
            scorable(name, items, tok)


def scorable(name: str, items, tok) -> None:
    """Every choice of a user's task adds at least one token after its context with tokenizer
    ``tok`` (a file is small: tokenising it costs less than a second; the built-in tasks are
    known to pass)."""
    from .evaluate.multiple_choice import encode_requests

    for i, item in enumerate(items):
        try:
            encode_requests(tok, item.requests())
        except ValueError as e:
            raise ValueError(f"eval.tasks: {name}: item {i}: {e}; give every choice some "
                             "text") from None


def task_tokenizer(src: ckpt.Checkpoint, job) -> None:
    """Scoring tasks turns their text into tokens with the checkpoint's tokenizer: one imported
    without it (a megatron checkpoint without model.tokenizer) fails only after the model loaded
    and the held-out loss ran."""
    ev, p = getattr(job, "eval", None), getattr(job, "prune", None)
    field = f"eval.tasks={list(ev.tasks)}" if ev is not None and ev.tasks else \
        f"prune.depth_task={p.depth_task!r}" if p is not None and p.depth == "accuracy" else None
    if field and not src.has_tokenizer:
        raise ValueError(f"{field} needs the tokenizer of model.checkpoint={src.path}, which has "
                         "no tokenizer/ directory; re-import it with one (a megatron checkpoint: "
                         "model.tokenizer=<Hugging Face tokenizer>) or drop the tasks")
    if field:
        src.tokenizer()  # a damaged one: named now, not after the model ran (under a second)


def not_replacing(output, source, overwrite: bool, field: str) -> None:
    """overwrite=true replaces the whole output directory: one that holds the input (or is it)
    would delete the input once the stage is done."""
    out, src = Path(output).expanduser().resolve(), Path(source).expanduser().resolve()
    if out == src or (overwrite and out in src.parents):
        raise ValueError(f"output={output} would replace {field}={source}, which the stage "
                         "reads; choose an output directory outside it")


def calibration_sizes(job, dp: int) -> None:
    p = job.prune
    if p.scores is None and p.importance == "activation":
        need_samples(job.data, "train", p.micro_batch_size * dp,
                     "prune.micro_batch_size x ranks needs")
    if p.depth == "lm_loss":
        need_samples(job.data, "valid", p.micro_batch_size * dp,
                     "prune.micro_batch_size x ranks needs")


def depth_task(prune) -> None:
    """The items of prune.depth=accuracy's task load (an MMLU subject or a user's file is read
    only after the calibration, with the model built)."""
    t = prune.depth_task
    if prune.depth != "accuracy":
        return
    if t not in TASKS and not t.startswith(("jsonl:", "mmlu_")):
        raise ValueError(f"prune.depth_task={t!r} is unknown; known: {sorted(TASKS)}, "
                         "mmlu_<subject> or jsonl:<path>")
    if t.startswith("jsonl:") and not Path(t[6:]).is_file():
        raise ValueError(f"prune.depth_task={t!r}: {t[6:]} not found; jsonl:<path> needs an "
                         "existing JSONL file of multiple-choice items")
    try:
        load_task(t, limit=prune.depth_task_limit)
    except (ValueError, OSError) as e:
        raise ValueError(f"prune.depth_task={t!r}: {e}") from None


def hub_reachable(name: str, field: str = "model.source") -> None:
    """A hub name needs the hub (or a cached copy): fail in seconds, not after three retries."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache

        if any(isinstance(try_to_load_from_cache(name, f), str)
               for f in ("config.json", "tokenizer_config.json")):
            return  # downloaded before: transformers reads the cache
        endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    except ImportError:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    fix = f"no network: download it elsewhere and pass the local directory ({field}=/path/to/it)"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ValueError(f"{field}={name} is a hub name and HF_HUB_OFFLINE is set; {fix}")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=5).close()
    except urllib.error.HTTPError:
        return  # the hub answered (with an error page): the network is there
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ValueError(f"{field}={name} is a hub name but {endpoint} cannot be reached "
                         f"({reason}); {fix}") from None


# ------------------------------------------------------------------ one check per stage
def import_(job) -> None:
    hf_checks.default_output(job, demo.checkpoint_dir(),
                             assets.cache_dir() / assets.ASSETS["smollm2"].target)
    out = job.output or job.model.checkpoint
    where, gguf = resolve_source(job.model.source, job.model.gguf_file)
    local = Path(where)
    if local.exists():
        not_replacing(out, local, job.overwrite, "model.source")
    atomic.check_new_dir(out, job.overwrite)
    megatron_only(job.model, local)
    if not local.is_dir():
        return hub_reachable(where)
    if gguf:
        if not (local / gguf).is_file():
            raise FileNotFoundError(f"model.gguf_file={gguf} not found in {local}")
        return
    if is_megatron_checkpoint(local):  # its reader checks the format and the architecture
        return
    if not (local / "config.json").is_file():
        ggufs = sorted(p.name for p in local.glob("*.gguf"))
        hint = f"pass model.gguf_file= one of {ggufs}" if ggufs else \
            "give a Hugging Face model directory (config.json + weights)"
        raise FileNotFoundError(f"model.source={local} has no config.json; {hint}")
    hf_checks.hf_dir(local)  # config, weight headers and tokenizer, before the weights load


def megatron_only(model, local: Path) -> None:
    """model.arch and model.tokenizer describe a megatron checkpoint, which records neither; a
    Hugging Face or GGUF source has its own, and the importer would ignore them silently."""
    given = [f"model.{k}" for k in ("arch", "tokenizer") if getattr(model, k)]
    if given and not (local.is_dir() and is_megatron_checkpoint(local)):
        raise ValueError(f"{' and '.join(given)}: only for a megatron checkpoint source; "
                         f"model.source={model.source} brings its own config and tokenizer, so "
                         f"drop {'them' if len(given) > 1 else 'it'}")


def export(job) -> None:
    src = checkpoint(job.model.checkpoint)
    if job.format == "megatron":  # written at parallel.tp/pp: under torchrun this surfaced late
        p = job.parallel
        src.arch.check_parallel(p.tp, p.pp, p.ep)
        if src.arch.longrope_context is not None:
            raise ValueError(f"format=megatron: {job.model.checkpoint} uses LongRoPE, which "
                             "megatron-core's rotary embedding cannot express; export it with "
                             "format=hf")
    not_inside(job.output, job.model.checkpoint)
    not_replacing(job.output, job.model.checkpoint, job.overwrite, "model.checkpoint")
    atomic.check_new_dir(job.output, job.overwrite)


def data(job) -> None:
    files = [f.resolve() for f in expand_paths(job.inputs)]  # exist, with a suffix we read
    for f in files:
        check_readable(f)  # a compression whose package is missing
    twice = sorted({str(f) for f in files if files.count(f) > 1})
    if twice:  # the copies may land in both splits: the held-out loss would score training text
        raise ValueError(f"inputs: {twice[0]} is read twice (listed twice, or also inside a "
                         "listed directory); name each file once")
    if Path(job.tokenizer).expanduser().is_file():  # transformers reads it as a config: traceback
        raise ValueError(f"tokenizer={job.tokenizer} is a file; give its directory, a checkpoint "
                         "directory (with tokenizer/) or a Hugging Face tokenizer name")
    if not Path(job.tokenizer).exists() and not job.tokenizer.startswith((".", "/", "~")):
        hub_reachable(job.tokenizer, "tokenizer")
    if str(job.output).endswith((".bin", ".idx")):  # it would write <output>.bin.bin
        raise ValueError(f"output={job.output} is the prefix of the files to write, without "
                         f"their suffix; use output={str(job.output)[:-4]}")
    out = [Path(f"{job.output}.{s}") for s in ("bin", "idx", "json")]  # .json: its metadata
    read = [f for f in out if f.resolve() in files]
    if read:  # the corpus itself would be replaced by the dataset's metadata
        raise ValueError(f"output={job.output} would write {read[0].name}, which is one of the "
                         "inputs; choose another output prefix")
    if not job.overwrite and any(p.exists() for p in out[:2]):
        raise FileExistsError(f"output={job.output}: an indexed dataset is already there; "
                              "choose another output or pass overwrite=true")
    if not job.overwrite and out[2].exists():
        raise FileExistsError(f"output={job.output}: {out[2]} exists and would be replaced by the "
                              "dataset's metadata; choose another output prefix or pass "
                              "overwrite=true")


def evaluate(job) -> None:
    src = checkpoint(job.model.checkpoint)
    if job.output:
        not_inside(job.output, job.model.checkpoint)
        if Path(job.output).suffix.lower() == ".md":  # the report is written beside the JSON
            raise ValueError(f"output={job.output}: name the results JSON (e.g. "
                             f"{Path(job.output).with_suffix('.json')}); its Markdown report is "
                             "written beside it with the suffix .md")
    check_evaluate(src.arch, job.parallel, job.eval)
    task_tokenizer(src, job)
    eval_inputs(job, data_parallel_size(job.parallel), src)
    positions(src.arch, job.data)
    vocabulary(src.arch, job.data)


def prune(job) -> None:
    src = checkpoint(job.model.checkpoint)
    p = job.prune
    resolve_targets(p.target, src.arch, job.parallel.tp, job.parallel.pp)
    src.arch.check_parallel(job.parallel.tp, job.parallel.pp, job.parallel.ep)
    keep_layers(p.keep_layers, src.arch)
    layers = p.target.num_layers
    if p.keep_layers and layers is not None and layers != len(p.keep_layers):  # it kept 2 of 3
        raise ValueError(f"prune.keep_layers lists {len(p.keep_layers)} layers but "
                         f"prune.target.num_layers={layers}; give one of them "
                         "(prune.target.num_layers=null to keep the listed layers)")
    if p.scores:
        scores(p.scores, src.arch)
    depth_task(p)
    task_tokenizer(src, job)
    not_inside(job.output, job.model.checkpoint)
    not_replacing(job.output, job.model.checkpoint, job.overwrite, "model.checkpoint")
    # overwrite=true replaces the whole directory: the data and scores read must not be in it
    not_replacing(job.output, f"{job.data.prefix}.bin", job.overwrite, "data.prefix")
    if p.scores:
        not_replacing(job.output, p.scores, job.overwrite, "prune.scores")
    atomic.check_new_dir(job.output, job.overwrite)
    calibration_sizes(job, data_parallel_size(job.parallel))
    positions(src.arch, job.data)
    if (p.scores is None and p.importance == "activation") or p.depth == "lm_loss":
        vocabulary(src.arch, job.data)  # the tokens it runs the model on


def same_tokenizer(student, teacher) -> None:
    """The logit loss compares the two models id by id: two tokenizers of one vocabulary size
    (Llama-2 and Mistral, 32000 each) distill without an error into nonsense."""
    try:
        ours, theirs = tokenizer_fingerprint(student), tokenizer_fingerprint(teacher)
    except (ValueError, OSError):
        return  # unreadable: loading it names the file
    if ours and theirs and ours != theirs:
        raise ValueError(f"model.checkpoint={student} and kd.teacher={teacher} have tokenizers "
                         "with different vocabularies (tokenizer/tokenizer.json): distillation "
                         "matches token ids, so they need the same tokenizer")


def same_student(job, arch: Arch) -> None:
    """A run directory continues (or reports as done) the run it holds: one of another
    model.checkpoint was resumed silently, its model trained and saved in place of the one
    given. The parent that its checkpoints record is another directory, or another shape; or,
    for a distillation, the teacher they record is another existing directory."""
    out = Path(job.output)
    if job.overwrite or not out.is_dir():
        return
    real = lambda x: Path(x).expanduser().resolve()  # noqa: E731
    want = real(job.model.checkpoint)
    kd = getattr(job, "kd", None)  # distill: the teacher (or its cache) it learns from
    teacher = kd and (kd.teacher_cache or kd.teacher)  # a cache stands in for the teacher
    stage = "finetune" if kd is None else "distill"
    for p in [*train_state.saved(out), out / "final"]:
        try:
            meta = ckpt.read_json(p / ckpt.META)
            held = Arch.from_json(p / ckpt.ARCH)
        except (ValueError, OSError, KeyError, TypeError):
            continue  # unreadable or absent: the run directory's own checks report it
        if meta.get("stage") in ("finetune", "distill") and meta["stage"] != stage:
            raise ValueError(f"output={job.output} holds a `minitron {meta['stage']}` run "
                             f"({p.relative_to(out)}), which `minitron {stage}` would continue as "
                             "its own; choose another output, or pass overwrite=true to train "
                             "from the start")
        moved = train_state.other_data_order(p, train_state.data_order(job.data, job.train))
        if moved:
            field, saved, now = moved
            raise ValueError(f"output={job.output} holds a run trained with {field}={saved} "
                             f"({p.relative_to(out)}); resuming it with {field}={now} would "
                             "train on another sample order from there: give the same value, "
                             "another output, or overwrite=true to train from the start")
        parent, was = meta.get("parent"), meta.get("teacher")
        src = real(parent or want)
        if src != want and (src.exists() or held != arch):
            raise ValueError(f"output={job.output} holds a run of model.checkpoint={parent} "
                             f"({p.relative_to(out)}), which would be continued in place of "
                             f"{job.model.checkpoint}; choose another output, or pass "
                             "overwrite=true to train from the start")
        if was and teacher and real(was) != real(teacher) and Path(was).exists():
            field = "kd.teacher_cache" if kd.teacher_cache else "kd.teacher"
            raise ValueError(f"output={job.output} holds a run distilled from {was} "
                             f"({p.relative_to(out)}), which would continue from "
                             f"{field}={teacher}; choose another output, or pass overwrite=true "
                             "to train from the start")


def train(job) -> None:
    """finetune and distill."""
    student = checkpoint(job.model.checkpoint)
    kd = getattr(job, "kd", None)
    live = kd is not None and not kd.teacher_cache
    check_layout({"model.checkpoint": student.arch,
                  **({"kd.teacher": checkpoint(kd.teacher, "kd.teacher").arch} if live else {})},
                 job.parallel.tp, job.parallel.pp, job.parallel.ep)
    if kd is not None and kd.teacher_cache:
        check_run(kd.teacher_cache, teacher=kd.teacher, student=job.model.checkpoint,
                  data=job.data, train=job.train, kd=kd)
        kd = None  # no teacher is built: nothing of it to check
    if kd is not None:
        teacher = checkpoint(kd.teacher, "kd.teacher")
        try:
            check_vocab(student.arch.vocab_size, teacher.arch.vocab_size)
        except ValueError as e:
            raise ValueError(f"kd.teacher={kd.teacher}: {e}") from None
        same_tokenizer(job.model.checkpoint, kd.teacher)
        if kd.top_k is not None and kd.top_k > teacher.arch.vocab_size:
            raise ValueError(f"kd.top_k={kd.top_k} is more than the teacher's vocabulary "
                             f"({teacher.arch.vocab_size}); lower it, or unset it for the full "
                             "distribution")
        kd_pairs(kd, job.model.checkpoint, kd.teacher, student.arch, teacher.arch)
        not_inside(job.output, kd.teacher)
        positions(teacher.arch, job.data, "kd.teacher")
        vocabulary(teacher.arch, job.data, "kd.teacher")
    not_inside(job.output, job.model.checkpoint)
    train_sizes(job, data_parallel_size(job.parallel))
    positions(student.arch, job.data)
    vocabulary(student.arch, job.data)
    loggers(job.train)
    same_student(job, student.arch)


def search(job) -> None:
    src, _, chosen = plan_candidates(job)
    if job.prune.scores:
        scores(job.prune.scores, src.arch)
    if not job.search.plan_only:
        task_tokenizer(src, job)
    for c in chosen:
        kd_pairs(job.kd, None, None, c.target.resolve(src.arch), src.arch)
    not_inside(job.output, job.model.checkpoint)
    dp = data_parallel_size(job.parallel)
    train_sizes(job, dp)
    eval_inputs(job, dp, src)
    calibration_sizes(job, dp)
    positions(src.arch, job.data)
    vocabulary(src.arch, job.data)
    shared_cache.check(job)
    loggers(job.train)


def pipeline(job) -> None:
    """Every round, against the architecture that round's teacher will have, before the first
    stage (teacher correction) starts."""
    src = checkpoint(job.model.checkpoint)
    tp, pp = job.parallel.tp, job.parallel.pp
    src.arch.check_parallel(tp, pp, job.parallel.ep)
    check_aux_loss(job.train, src.arch)  # every round's student has the source's family
    depth_task(job.prune)
    task_tokenizer(src, job)
    not_inside(job.output, job.model.checkpoint)
    recipe_record.refuse(job, job.output)  # a relaunch with another recipe, before its log
    dp = data_parallel_size(job.parallel)
    train_sizes(job, dp)
    eval_inputs(job, dp, src)
    calibration_sizes(job, dp)
    positions(src.arch, job.data)
    vocabulary(src.arch, job.data)
    round_cache(job, src.arch)
    loggers(job.train)
    rounds = job.pipeline.rounds or [RoundConfig(target=job.prune.target)]
    teachers = [src.arch]  # the architectures this round's teacher may have (several after a
    for i, rnd in enumerate(rounds, 1):  # search: any selected candidate may win)
        name = rnd.name or f"round{i}"
        field = f"pipeline.rounds[{i - 1}]" if job.pipeline.rounds else "prune"
        where = f" of {name}"
        students = []
        for arch in teachers:
            before = len(students)
            keep_layers(job.prune.keep_layers, arch, where)
            if job.prune.scores:
                scores(job.prune.scores, arch, where)
            if rnd.budget is not None:
                searched = Path(job.output) / name / "search"
                if (searched / CHOSEN).is_file():  # this round's search already ran (resume)
                    students.append(arch.replace(**read_chosen(searched).target))
                    continue
                space = dataclasses.replace(job.search, budget=rnd.budget)
                found = enumerate_candidates(arch, space, tp, pp)
                if not found:
                    raise ValueError(f"{field}.budget={rnd.budget:g} ({name}): "
                                     + describe_empty(arch, space, tp, pp))
                students += [c.target.resolve(arch) for c in select(found,
                                                                      job.search.max_candidates)]
            else:
                new = resolve_targets(
                    rnd.target, arch, tp, pp, field,
                    f"{name}'s teacher has {arch.num_params() / 1e6:.2f}M parameters "
                    f"({arch.num_layers} layers, hidden {arch.hidden_size}): " if i > 1 else "")
                if job.prune.keep_layers is not None:  # explicit layers override the depth target
                    new = new.replace(num_layers=len(set(job.prune.keep_layers)))
                elif new == arch:  # it would distill a copy of the teacher into itself
                    raise ValueError(
                        f"{field}.target={rnd.target.as_dict()} keeps every size of {name}'s "
                        f"teacher, so the round prunes nothing; set a smaller size, e.g. "
                        f"{field}.target.ffn_hidden_size={arch.ffn_hidden_size // 2}")
                students.append(new)
            if job.pipeline.export:  # the last stage of a round: refused now, not after training
                for s in students[before:]:
                    try:
                        export_family(s)
                    except ValueError as e:
                        raise ValueError(f"{field} ({name}) ends in a Hugging Face export: {e} "
                                         "(or set pipeline.export=false)") from None
            if not job.kd.auto_hidden_pairs:  # auto pairs come from the plan the round writes
                for s in students[before:]:
                    kd_pairs(job.kd, None, None, s, arch)
        teachers = students


def round_cache(job, arch) -> None:
    """pipeline.teacher_cache=round: the kd settings a cache serves, sizes that fit (the rounds'
    teachers share the source's vocabulary)."""
    if job.pipeline.teacher_cache != "round" or job.kd.teacher_cache:
        return
    why = shared_cache.live_teacher_needed(job.kd)
    if why:
        raise ValueError(f"pipeline.teacher_cache=round: {why} needs the live teacher, which a "
                         "cache does not hold; set pipeline.teacher_cache=off")
    shared_cache.check_sizes(job, arch.vocab_size, "pipeline.teacher_cache")


def teacher_cache(job) -> None:
    teacher = checkpoint(job.kd.teacher, "kd.teacher")
    teacher.arch.check_parallel(job.parallel.tp, job.parallel.pp)
    if job.cache.k > teacher.arch.vocab_size:
        raise ValueError(f"cache.k={job.cache.k} exceeds the teacher's vocabulary "
                         f"({teacher.arch.vocab_size})")
    not_inside(job.output, job.kd.teacher)
    train_sizes(job, data_parallel_size(job.parallel))
    positions(teacher.arch, job.data, "kd.teacher")
    vocabulary(teacher.arch, job.data, "kd.teacher")


CHECKS = {"import": import_, "export": export, "data": data, "evaluate": evaluate,
          "prune": prune, "finetune": train, "distill": train, "search": search,
          "pipeline": pipeline, "teacher_cache": teacher_cache}


# what output= names, where it is not a directory to create: data writes <output>.bin/.idx,
# evaluate the results JSON itself
OUTPUT_KINDS = {"data": "prefix", "evaluate": "file"}


def check(stage: str, job) -> None:
    """Raise ValueError/OSError naming the field or file when ``job`` cannot run."""
    out = getattr(job, "output", None) or (job.model.checkpoint if stage == "import" else None)
    if out:
        atomic.check_output_place(out, OUTPUT_KINDS.get(stage, "dir"))
    CHECKS[stage](job)

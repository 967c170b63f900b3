"""Multiple-choice downstream tasks read from local files, in lm-evaluation-harness' prompt formats.

Every task turns into a list of :class:`Item`: a context, the continuations to score after it (the
harness' target delimiter, one space, included: ``" Paris"``) and the index of the right one.
Winogrande is scored the harness' "partial" way: each option is substituted into the sentence,
which then ends the *context*, and all options share one continuation (the rest of the sentence);
such items carry one context per choice in :attr:`Item.contexts`.

Data comes from the embedded eval asset (``python -m nemo_minitron.assets install eval``): Hugging
Face ``save_to_disk`` directories of Arrow IPC streams, read with pyarrow alone. Only validation
splits are shipped (MMLU also has ``dev`` and ``test``), so every task is evaluated on its
validation split by default: note that the harness reports MMLU on ``test`` (pass
``split="test"`` for numbers comparable to it) and that ARC/OpenBookQA/SciQ papers often quote
``test`` too. ``jsonl:<path>`` reads a user-defined task: one JSON object per line with
``context`` (str), ``choices`` (list of str, scored verbatim after the context, so include the
leading space) and ``label`` (int).

Few-shot: ``num_fewshot`` solved examples, joined by blank lines, precede the item's own prompt.
They come from the task's training split when one is installed (none is: the asset ships
validation only), from ``dev`` for MMLU (its first ``n``, as the harness does), else from the same
split with the item itself excluded. Each item draws with its own generator seeded by
``(seed, task, item index)``, so an item's context does not depend on ``limit`` or on the other
items, and is identical across processes.
"""

from __future__ import annotations

import difflib
import json
import logging
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from .. import assets
from ..config.constants import TASK_NAMES

# pyarrow is imported where the arrow files are read: an optional, heavy dependency that the
# schema's and the CLI's use of the task table does not need.

log = logging.getLogger(__name__)

FEWSHOT_DELIMITER = "\n\n"
TARGET_DELIMITER = " "


@dataclass
class Item:
    """One question: ``choices[i]`` is scored after ``contexts[i]`` (or ``context`` for all)."""

    context: str
    choices: list[str]
    label: int
    contexts: list[str] | None = None  # per-choice contexts (partial scoring, Winogrande);
    # ``context`` is then the text they share (few-shot prefix + sentence up to the blank)

    def requests(self) -> list[tuple[str, str]]:
        """``(context, continuation)`` for every choice, in order."""
        ctxs = self.contexts if self.contexts is not None else [self.context] * len(self.choices)
        return list(zip(ctxs, self.choices))

    def norm_lengths(self) -> list[int]:
        """Characters each choice's log-likelihood is divided by for ``acc_norm``: the choice
        text without the target delimiter, as the harness counts it (at least 1)."""
        return [max(1, len(c[len(TARGET_DELIMITER):] if c.startswith(TARGET_DELIMITER) else c))
                for c in self.choices]


# ----------------------------------------------------------------------------------------------
# reading Hugging Face save_to_disk directories


def data_root() -> Path:
    """The embedded eval data: ``<cache>/eval/hf_datasets`` (raises naming the install command)."""
    return assets.path("eval")


def _read_arrow(path: Path):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    with pa.memory_map(str(path)) as src:
        try:
            return ipc.open_stream(src).read_all()
        except pa.ArrowInvalid:  # the random-access "file" format (older `datasets` versions)
            src.seek(0)
            return ipc.open_file(src).read_all()


@lru_cache(maxsize=64)
def read_split(directory: str) -> tuple[dict, ...]:
    """All rows of one split directory (``data-*.arrow`` + ``state.json``), as dicts."""
    import pyarrow as pa

    d = Path(directory)
    state = d / "state.json"
    files = []
    if state.is_file():
        files = [d / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    if not files:
        files = sorted(d.glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"no arrow files in {d}")
    table = pa.concat_tables([_read_arrow(f) for f in files])
    return tuple(table.to_pylist())


# ----------------------------------------------------------------------------------------------
# task definitions


@dataclass
class Example:
    """One document rendered the harness' way, before few-shot context is added."""

    query: str | list[str]  # doc_to_text; a list = one context per choice (Winogrande)
    choices: list[str]  # doc_to_choice, without the target delimiter
    label: int
    description: str = ""  # task description placed before everything (MMLU's subject line)
    shared: str = ""  # with per-choice queries: the text they all start with (for display)


@dataclass
class TaskSpec:
    name: str
    path: str  # under data_root()
    render: Callable[[dict], Example]
    split: str = "validation"
    fewshot_split: str | None = "train"  # used when installed; else the evaluation split
    fewshot_sampler: str = "random"  # or "first_n" (MMLU)


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    # brackets are artifacts of the WikiHow part of HellaSwag
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _arc(doc: dict) -> Example:
    labels = list(doc["choices"]["label"])
    return Example(f"Question: {doc['question']}\nAnswer:", list(doc["choices"]["text"]),
                   labels.index(doc["answerKey"]))


def _hellaswag(doc: dict) -> Example:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return Example(_hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                   [_hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


def _piqa(doc: dict) -> Example:
    return Example(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _winogrande(doc: dict) -> Example:
    s = doc["sentence"]
    idx = s.index("_")
    target = s[idx + 1:].strip()
    return Example([s[:idx] + doc["option1"], s[:idx] + doc["option2"]], [target, target],
                   {"1": 0, "2": 1}[str(doc["answer"])], shared=s[:idx])


def _boolq(doc: dict) -> Example:
    return Example(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"],
                   int(bool(doc["answer"])))


def _mmlu(doc: dict) -> Example:
    c = doc["choices"]
    q = (f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:")
    subject = doc["subject"].replace("_", " ")
    return Example(q, ["A", "B", "C", "D"], int(doc["answer"]),
                   description=f"The following are multiple choice questions (with answers) "
                               f"about {subject}.\n\n")


def _openbookqa(doc: dict) -> Example:
    labels = list(doc["choices"]["label"])
    return Example(doc["question_stem"], list(doc["choices"]["text"]),
                   labels.index(doc["answerKey"].lstrip()))


def _sciq(doc: dict) -> Example:
    return Example(f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:",
                   [doc["distractor1"], doc["distractor2"], doc["distractor3"],
                    doc["correct_answer"]], 3)


MMLU_DIR = "hails/mmlu_no_train"

TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("arc_easy", "ai2_arc/ARC-Easy", _arc),
    TaskSpec("arc_challenge", "ai2_arc/ARC-Challenge", _arc),
    TaskSpec("hellaswag", "hellaswag/none", _hellaswag),
    TaskSpec("piqa", "piqa/plain_text", _piqa),
    TaskSpec("winogrande", "winogrande/winogrande_xl", _winogrande),
    TaskSpec("boolq", "boolq/none", _boolq),
    TaskSpec("mmlu", MMLU_DIR, _mmlu, fewshot_split="dev", fewshot_sampler="first_n"),
    TaskSpec("openbookqa", "openbookqa/main", _openbookqa),
    TaskSpec("sciq", "sciq/none", _sciq),
)}
if tuple(TASKS) != TASK_NAMES:  # the schema checks task names against that table
    raise ImportError(f"evaluate.tasks defines {tuple(TASKS)} but config.constants.TASK_NAMES "
                      f"lists {TASK_NAMES}")


def mmlu_subjects(root: Path | None = None) -> list[str]:
    root = Path(root) if root is not None else data_root()
    return sorted(p.name for p in (root / MMLU_DIR).iterdir() if p.is_dir())


def task_names(root: Path | None = None) -> list[str]:
    """Every known task name (MMLU subjects as ``mmlu_<subject>``), plus ``jsonl:<path>``."""
    names = list(TASKS)
    try:
        names += [f"mmlu_{s}" for s in mmlu_subjects(root)]
    except FileNotFoundError:
        pass
    return names


def _spec(name: str, root: Path) -> tuple[TaskSpec, list[str]]:
    """The spec of ``name`` and the sub-directories (MMLU subjects) it spans."""
    if name in TASKS:
        spec = TASKS[name]
        return spec, (mmlu_subjects(root) if name == "mmlu" else [""])
    if name.startswith("mmlu_"):
        subject = name[len("mmlu_"):]
        if not subject or not (root / MMLU_DIR / subject).is_dir():  # "mmlu_": the MMLU dir
            known = mmlu_subjects(root)
            near = difflib.get_close_matches(subject, known, n=1)
            hint = f" (did you mean mmlu_{near[0]}?)" if near else ""
            raise ValueError(f"unknown MMLU subject {subject!r}{hint}; known: {', '.join(known)}")
        return TASKS["mmlu"], [subject]
    raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}, mmlu_<subject>, "
                     "jsonl:<path>")


def resolved_split(name: str, split: str | None = None) -> str:
    """The split ``load_task`` evaluates ``name`` on (for reporting)."""
    if name.startswith("jsonl:"):
        return "file"
    if split is not None:
        return split
    return TASKS["mmlu" if name.startswith("mmlu_") else name].split


# ----------------------------------------------------------------------------------------------
# items


def _shot(ex: Example) -> str:
    """A solved example: its prompt, the delimiter and its right answer."""
    if isinstance(ex.query, list):  # partial scoring: the right option substituted, then the rest
        return ex.query[ex.label] + TARGET_DELIMITER + ex.choices[ex.label]
    return ex.query + TARGET_DELIMITER + ex.choices[ex.label]


def _item(ex: Example, shots: list[Example]) -> Item:
    prefix = ex.description + "".join(_shot(s) + FEWSHOT_DELIMITER for s in shots)
    choices = [TARGET_DELIMITER + c for c in ex.choices]
    if isinstance(ex.query, list):
        return Item(prefix + ex.shared, choices, ex.label, contexts=[prefix + q for q in ex.query])
    return Item(prefix + ex.query, choices, ex.label)


def _fewshot(pool: list[Example], n: int, rng_key: str, exclude: int | None,
             sampler: str) -> list[Example]:
    if n <= 0:
        return []
    candidates = [i for i in range(len(pool)) if i != exclude]
    if len(candidates) < n:
        raise ValueError(f"num_fewshot={n} but only {len(candidates)} examples to draw from")
    if sampler == "first_n":
        return [pool[i] for i in candidates[:n]]
    return [pool[i] for i in random.Random(rng_key).sample(candidates, n)]


def _label(value, n_choices: int, where: str) -> int:
    """The 0-based index of the right choice. A choice's text or a fractional number would
    otherwise fail in int() with a message naming neither the file nor the field, or be
    truncated silently to another choice."""
    ok = isinstance(value, int) and not isinstance(value, bool) or \
        isinstance(value, str) and value.strip().isdigit()
    if not ok:
        raise ValueError(f"{where}: label {value!r} must be the 0-based index of the right choice "
                         "(an integer)")
    if not 0 <= int(value) < n_choices:
        raise ValueError(f"{where}: label {int(value)} out of range for {n_choices} choices")
    if n_choices < 2:  # always right: it would only raise the task's accuracy
        raise ValueError(f"{where}: choices must list at least two answers (found {n_choices})")
    return int(value)


def _load_jsonl(path: str, limit, num_fewshot, seed) -> list[Item]:
    rows, repeated = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at "
                                 f"column {e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg}); one item per "
                                 'line: {"context": ..., "choices": [...], "label": N}') from None
            if not isinstance(d, dict):
                raise ValueError(f"{path}:{lineno}: not a JSON object; one item per line: "
                                 '{"context": ..., "choices": [...], "label": N}')
            missing = {"context", "choices", "label"} - set(d)
            if missing:
                raise ValueError(f"{path}:{lineno}: missing field(s) {sorted(missing)}")
            if not isinstance(d["choices"], list) or not all(isinstance(c, str)
                                                              for c in d["choices"]):
                raise ValueError(f"{path}:{lineno}: choices must be a list of strings")
            if not isinstance(d["context"], str):
                raise ValueError(f"{path}:{lineno}: context must be a string (\"\" for none), "
                                 f"not {type(d['context']).__name__}")
            choices = list(d["choices"])
            label = _label(d["label"], len(choices), f"{path}:{lineno}")
            if len(set(choices)) < len(choices):
                repeated.append(lineno)
            rows.append((d["context"], choices, label))
    if repeated:  # equal scores: the first of them wins, so such an item is scored by position
        log.warning("%s: %d item(s) list the same choice twice (line %s%s); equal choices score "
                    "alike and the first counts as the answer", path, len(repeated), repeated[0],
                    ", ..." if len(repeated) > 1 else "")
    if not rows:
        raise ValueError(f"{path} holds no items; one item per line: "
                         '{"context": ..., "choices": [...], "label": N}')
    n = len(rows) if limit is None else min(limit, len(rows))
    items = []
    for i in range(n):
        ctx, choices, label = rows[i]
        prefix = ""
        if num_fewshot > 0:
            cand = [j for j in range(len(rows)) if j != i]
            if len(cand) < num_fewshot:
                raise ValueError(f"num_fewshot={num_fewshot} but {path} has {len(rows)} items")
            picks = random.Random(f"{seed}/jsonl/{i}").sample(cand, num_fewshot)
            prefix = "".join(rows[j][0] + rows[j][1][rows[j][2]] + FEWSHOT_DELIMITER for j in picks)
        items.append(Item(prefix + ctx, choices, label))
    return items


def load_task(name: str, limit: int | None = None, num_fewshot: int = 0, seed: int = 1234, *,
              split: str | None = None, data_dir=None) -> list[Item]:
    """The items of task ``name`` (see :func:`task_names`), first ``limit`` of them.

    ``limit`` applies per MMLU subject for ``mmlu`` (as the harness applies it per sub-task).
    ``split``: override the evaluation split (``validation`` by default; MMLU also has ``test``
    and ``dev``). ``data_dir``: the ``hf_datasets`` directory (default: the installed asset).
    """
    if num_fewshot < 0:
        raise ValueError("num_fewshot must be >= 0")
    if name.startswith("jsonl:"):
        return _load_jsonl(name[len("jsonl:"):], limit, num_fewshot, seed)
    root = Path(data_dir) if data_dir is not None else data_root()
    spec, subdirs = _spec(name, root)
    split = split or spec.split
    items: list[Item] = []
    for sub in subdirs:
        base = root / spec.path / sub if sub else root / spec.path
        if not (base / split).is_dir():
            have = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
            raise FileNotFoundError(f"{name}: no split {split!r} under {base} (have {have})")
        docs = [spec.render(d) for d in read_split(str(base / split))]
        pool, exclude_self = docs, True
        if num_fewshot > 0 and spec.fewshot_split and spec.fewshot_split != split \
                and (base / spec.fewshot_split).is_dir():
            pool = [spec.render(d) for d in read_split(str(base / spec.fewshot_split))]
            exclude_self = False
        n = len(docs) if limit is None else min(limit, len(docs))
        key = f"{name}/{sub}" if sub else name
        for i in range(n):
            shots = _fewshot(pool, num_fewshot, f"{seed}/{key}/{i}", i if exclude_self else None,
                             spec.fewshot_sampler)
            items.append(_item(docs[i], shots))
    return items

"""Runs side by side (``minitron report``): one Markdown table and one PNG of their loss curves.

Reads only what the stages wrote (JSON, metrics.jsonl, ``arch.json``); no weights are loaded. A
run is one of:

- a **pipeline** run directory: ``summary.json`` and/or round directories with
  ``eval_{teacher,pruned,distilled}.json`` and ``distill/metrics.jsonl`` (one row per round;
  an interrupted pipeline without ``summary.json`` still reports the rounds it finished), or
  one round directory;
- a **distill / finetune** run directory: ``metrics.jsonl`` and ``final/`` (a run still in
  progress reports its latest validation loss);
- an **evaluate** results file (the JSON ``minitron evaluate`` writes: ``loss``, optionally
  ``tasks``), or a directory holding ``eval_results.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..arch import Arch
from ..artifacts.checkpoint_meta import META, read_checkpoint_meta
from ..artifacts.evaluation import EvalResults, read_eval
from ..artifacts.metrics import METRICS, read_metrics
from ..artifacts.pipeline_files import PipelineSummary, RoundRecord, SUMMARY, read_summary
from ..artifacts.reports import write_markdown
from ..convert.checkpoint import ARCH
from .judge import fmt_acc, fmt_ratio, mean_retained, mean_retained_stderr, task_rows
from .plots import plot_loss_curves

WHO = ("teacher", "pruned", "final")  # validation-loss columns


@dataclass
class Row:
    """One line of the table."""

    run: str
    kind: str
    params: int | None = None
    val_loss: dict[str, float] = field(default_factory=dict)  # keys among WHO
    tasks: dict[str, float] = field(default_factory=dict)  # acc_norm of the final model
    seconds: float | None = None
    task_table: list[dict] = field(default_factory=list)  # judge.task_rows over WHO
    curves: list[tuple[str, list[dict]]] = field(default_factory=list)  # (label, metrics rows)


# ----------------------------------------------------------------------------------------------
# reading runs


def _by_step(rows: list[dict]) -> list[dict]:
    """One row per step, later lines winning: a resumed run re-logs the steps after its
    checkpoint, and the final validation loss is logged at the last step."""
    merged: dict[int, dict] = {}
    for r in rows:
        if "step" in r:
            merged.setdefault(int(r["step"]), {}).update(r)
    return [merged[s] for s in sorted(merged)]


def _last_val_loss(rows: list[dict]) -> float | None:
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    return float(vals[-1]) if vals else None


def _params_of(checkpoint) -> int | None:
    if checkpoint is None:
        return None
    f = Path(checkpoint) / ARCH
    return Arch.from_json(f).num_params() if f.is_file() else None


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _is_round(d: Path) -> bool:
    return any(d.glob("eval_*.json")) or (d / "distill" / METRICS).is_file()


def _round_dirs(d: Path) -> list[Path]:
    return sorted((c for c in d.iterdir() if c.is_dir() and _is_round(c)),
                  key=lambda c: _natural(c.name))


def _round_row(rd: Path, name: str, rec: RoundRecord | None) -> Row:
    """One pipeline round: its evaluations (files first, else what summary.json recorded)."""
    evals: dict[str, EvalResults] = {
        who: read_eval(rd / f"eval_{who}.json")
        for who in ("teacher", "pruned", "distilled") if (rd / f"eval_{who}.json").is_file()}
    rec = rec or RoundRecord(rd.name)
    loss = dict(rec.val_loss)
    loss.update({k: v.loss for k, v in evals.items() if v.loss is not None})
    val = {"teacher": loss.get("teacher"), "pruned": loss.get("pruned"),
           "final": loss.get("distilled")}
    tasks = dict(rec.tasks.get("distilled", {}))
    if "distilled" in evals:
        tasks.update(evals["distilled"].task_scores())
    params = rec.student_params
    if params is None:
        params = _params_of(rd / "distill" / "final") or _params_of(rd / "pruned")
    row = Row(name, "pipeline", params, {k: float(v) for k, v in val.items() if v is not None},
              tasks)
    row.task_table = task_rows({"final" if k == "distilled" else k: v.raw
                                for k, v in evals.items()})
    metrics = rd / "distill" / METRICS
    if metrics.is_file():
        row.curves.append((name, _by_step(read_metrics(metrics))))
    return row


def _pipeline_rows(d: Path, label: str) -> list[Row]:
    summary = read_summary(d) if (d / SUMMARY).is_file() else PipelineSummary()
    recorded = {r.name: r for r in summary.rounds}
    rounds = [d / n for n in recorded] or _round_dirs(d)
    if not rounds:
        raise ValueError(f"{d}: pipeline summary.json lists no rounds and no round directory "
                         "has eval_*.json or distill/metrics.jsonl")
    rows = [_round_row(rd, label if len(rounds) == 1 else f"{label} [{rd.name}]",
                       recorded.get(rd.name)) for rd in rounds]
    correction = d / "teacher_correction" / METRICS
    if correction.is_file():
        rows[0].curves.insert(0, (f"{label} [teacher correction]",
                                  _by_step(read_metrics(correction))))
    if summary.seconds is not None:  # the whole pipeline, on its last row; a resumed one: its
        # stages over all invocations (the last invocation did only the rest)
        rows[-1].seconds = max(summary.seconds, summary.seconds_all or 0.0)
    return rows


def _training_row(d: Path, label: str) -> Row:
    rows = read_metrics(d / METRICS)
    final = d / "final"
    if final.is_dir():
        stage = read_checkpoint_meta(final).stage if (final / META).is_file() else None
        kind = stage or "training"
        params = _params_of(final)
    else:
        steps = sorted((d / "checkpoints").glob("step_*")) if (d / "checkpoints").is_dir() else []
        kind = "training (no final/ yet)"
        params = _params_of(steps[-1]) if steps else None
    val = _last_val_loss(rows)
    row = Row(label, kind, params, {"final": val} if val is not None else {})
    row.curves.append((label, _by_step(rows)))
    return row


def _evaluate_row(f: Path, label: str) -> Row:
    ev = read_eval(f)
    row = Row(label, "evaluate", _params_of(ev.checkpoint) if ev.checkpoint else None,
              {"final": ev.loss} if ev.loss is not None else {}, ev.task_scores())
    row.seconds = ev.seconds
    row.task_table = task_rows({"final": ev.raw})
    return row


def load_run(path, label: str | None = None) -> list[Row]:
    """The table rows of one run (several for a multi-round pipeline)."""
    p = Path(path)
    label = label or str(path)
    if p.is_file():
        return [_evaluate_row(p, label)]
    if p.is_dir():
        if (p / SUMMARY).is_file() or _round_dirs(p):
            return _pipeline_rows(p, label)
        if _is_round(p):  # one round directory of a pipeline
            return [_round_row(p, label, {})]
        if (p / METRICS).is_file():
            return [_training_row(p, label)]
        if (p / "eval_results.json").is_file():
            return [_evaluate_row(p / "eval_results.json", label)]
    what = "does not exist" if not p.exists() else "is neither kind of run"
    raise ValueError(f"{path} {what}: expected a pipeline run directory (summary.json or "
                     "round*/eval_*.json), a distill/finetune run directory (metrics.jsonl), or a "
                     "`minitron evaluate` results JSON (or a directory with eval_results.json)")


# ----------------------------------------------------------------------------------------------
# the report


def _params(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _seconds(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"


def _num(v: float | None, digits: int) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def markdown_table(rows: list[Row]) -> str:
    """The comparison table; loss columns nobody has are left out, tasks are the union."""
    who = [w for w in WHO if any(w in r.val_loss for r in rows)]
    tasks = sorted({t for r in rows for t in r.tasks})
    head = (["run", "kind", "parameters"] + [f"val loss ({w})" for w in who]
            + [f"{t} (acc_norm)" for t in tasks] + ["wall time"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([r.run.replace("|", "\\|"), r.kind, _params(r.params)]
                 + [_num(r.val_loss.get(w), 4) for w in who]
                 + [_num(r.tasks.get(t), 3) for t in tasks] + [_seconds(r.seconds)])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _judged(rows: list[Row]) -> bool:
    """Whether any result carries a chance level or a stderr (older results files have neither,
    and then the task table would only repeat the acc_norm columns)."""
    return any(t["chance"] is not None or any(e is not None for e in t["stderr"].values())
               for r in rows for t in r.task_table)


def task_table(rows: list[Row]) -> str:
    """Per run and task: items, chance, acc_norm ± stderr of teacher / pruned / final, and the
    final model's retained above-chance accuracy (with its mean over the run's tasks)."""
    who = [w for w in WHO if any(w in t["acc"] for r in rows for t in r.task_table)]
    head = ["run", "task", "items", "chance"] + [f"acc_norm ({w})" for w in who] + ["retained"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for t in r.task_table:
            lines.append("| " + " | ".join(
                [r.run.replace("|", "\\|"), t["task"], str(t["n"] or "—"), fmt_ratio(t["chance"])]
                + [fmt_acc(t["acc"].get(w), t["stderr"].get(w)) for w in who]
                + [fmt_ratio(t["retained"].get("final"),
                             t.get("retained_stderr", {}).get("final"))]) + " |")
        m = mean_retained(r.task_table, "final")
        if m is not None:
            mean = fmt_ratio(m, mean_retained_stderr(r.task_table, "final"))
            lines.append("| " + " | ".join([r.run.replace("|", "\\|"), "**mean**", "", ""]
                                           + [""] * len(who) + [f"**{mean}**"]) + " |")
    return "\n".join(lines)


def write_comparison(paths, output="report_compare.md") -> tuple[Path, Path | None]:
    """Write the Markdown report (and ``<output stem>.png`` with the loss curves, when any run
    has a metrics.jsonl). Returns both paths (the PNG's is None without curves)."""
    if not paths:
        raise ValueError("give at least one run directory or results file")
    rows = [row for p in paths for row in load_run(p)]
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    curves = [c for r in rows for c in r.curves if c[1]]
    png = None
    lines = ["# Run comparison", "", markdown_table(rows), "",
             "val loss: held-out LM loss; teacher = the round's teacher, pruned = before "
             "retraining, final = the distilled/trained model (or the evaluated checkpoint). "
             "Task columns: acc_norm of that final model. Wall time: the whole pipeline (on "
             "its last round), or the evaluation. — = not recorded.", ""]
    if _judged(rows):
        lines += ["## Downstream tasks", "", task_table(rows), "",
                  "acc_norm ± its standard error over the items; chance: accuracy of guessing "
                  "(mean of 1/choices); retained = (acc_final − chance) / (acc_teacher − chance) ± "
                  "its standard error, for runs that evaluated their teacher.", ""]
    if curves:
        png = plot_loss_curves(curves, out.with_suffix(".png"),
                               title="training (lines) and validation (markers) loss")
        lines += [f"![loss curves]({png.name})", ""]
    else:
        lines += ["No loss curves: none of the runs has a metrics.jsonl.", ""]
    lines += ["Runs:", ""] + [f"- `{p}`" for p in paths] + [""]
    write_markdown(out, lines, final_newline=False)
    return out, png

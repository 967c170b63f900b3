"""report.md for a pipeline run: teacher vs pruned vs distilled per round, with plots."""

from __future__ import annotations

from pathlib import Path

from ..artifacts.reports import write_markdown
from .judge import fmt_acc, fmt_ratio, mean_retained, mean_retained_stderr
from .plots import plot_training

WHO = ("teacher", "pruned", "distilled")


def mean_text(rows: list[dict], who: str) -> str:
    """``0.35 ± 0.10``: the mean retained ratio over the tasks and its standard error."""
    return fmt_ratio(mean_retained(rows, who), mean_retained_stderr(rows, who))


def task_section(rows: list[dict]) -> list[str]:
    """acc_norm ± stderr per model and task, the chance level, and how much of the teacher's
    above-chance accuracy the pruned and distilled students keep (mean over tasks last)."""
    who = [w for w in WHO if any(w in r["acc"] for r in rows)]
    students = [w for w in who if w != "teacher"]
    head = (["task", "items", "chance"] + [f"{w} acc_norm" for w in who]
            + [f"retained ({w})" for w in students])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([r["task"], str(r["n"] or "—"), fmt_ratio(r["chance"])]
                 + [fmt_acc(r["acc"].get(w), r["stderr"].get(w)) for w in who]
                 + [fmt_ratio(r["retained"].get(w), r.get("retained_stderr", {}).get(w))
                    for w in students])
        lines.append("| " + " | ".join(cells) + " |")
    if students:
        cells = (["**mean**", "", ""] + [""] * len(who)
                 + [f"**{mean_text(rows, w)}**" for w in students])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "acc_norm ± its standard error over the items; chance: accuracy of guessing "
                  "(mean of 1/choices); retained = (acc − chance) / (acc_teacher − chance): 1 keeps "
                  "the teacher's skill, 0 is guessing; ± its standard error (the two accuracies' "
                  "errors carried through the ratio), which on a few hundred items is wide.", ""]
    return lines


def acc_line(rows: list[dict] | None) -> list[str]:
    """The retained ratios on plain ``acc`` (no length normalisation), which can tell a different
    story from acc_norm on a small model: one line under the table, or nothing."""
    students = [w for w in WHO[1:] if rows and any(w in r["retained"] for r in rows)]
    if not students:
        return []
    parts = []
    for w in students:
        per = ", ".join(f"{r['task']} {fmt_ratio(r['retained'].get(w))}" for r in rows)
        parts.append(f"{w} {per}, mean **{mean_text(rows, w)}**")
    return ["Retained on plain acc (no length normalisation): " + "; ".join(parts) + ".", ""]


def write_report(out: Path, summary: dict) -> Path:
    lines = ["# Compression report", "",
             f"Teacher: `{summary['teacher']}`  ", f"Wall time: {summary['seconds']:.0f} s", ""]
    every = summary.get("stage_seconds_all", {})
    resumed = set(every) - set(summary.get("stage_seconds", {}))
    if resumed:  # the wall time is this invocation's; earlier ones did the other stages
        lines[-2:] = [f"Wall time: {summary['seconds']:.0f} s in this invocation, which resumed "
                      f"a run; its stages took {summary['seconds_all']:.0f} s over all "
                      "invocations (work lost to interruptions not counted)", ""]
    for r in summary["rounds"]:
        rd = out / r["name"]
        a = r["arch"]
        lines += [f"## {r['name']}", "",
                  f"Student: {a['num_layers']} layers, hidden {a['hidden_size']}, FFN "
                  f"{a['ffn_hidden_size']}, {a['num_attention_heads']} heads / "
                  f"{a['num_query_groups']} query groups, head_dim {a['head_dim']}", "",
                  "| model | parameters | validation loss |", "|---|---|---|",
                  f"| teacher | {r['params']['teacher'] / 1e6:.1f}M | {r['val_loss']['teacher']:.3f} |",
                  f"| pruned (before retraining) | {r['params']['student'] / 1e6:.1f}M | "
                  f"{r['val_loss']['pruned']:.3f} |",
                  f"| distilled | {r['params']['student'] / 1e6:.1f}M | "
                  f"{r['val_loss']['distilled']:.3f} |", ""]
        if r.get("task_table"):
            lines += task_section(r["task_table"]) + acc_line(r.get("task_table_acc"))
        elif r.get("tasks"):  # a summary written before task_table was recorded
            names = sorted(next(iter(r["tasks"].values())))
            lines += ["| model | " + " | ".join(f"{t} (acc_norm)" for t in names) + " |",
                      "|---|" + "---|" * len(names)]
            for who, accs in r["tasks"].items():
                lines.append(f"| {who} | " + " | ".join(f"{accs[t]:.3f}" for t in names) + " |")
            lines.append("")
        metrics = rd / "distill" / "metrics.jsonl"
        if metrics.is_file():
            plot_training(metrics, rd / "training.png", title=f"{r['name']}: distillation")
            lines += [f"![training]({r['name']}/training.png)", ""]
        pruned = Path(r.get("pruned_dir") or rd / "pruned")
        if (pruned / "importance.png").is_file():
            rel = pruned.relative_to(out) if pruned.is_relative_to(out) else pruned
            lines += [f"![importance]({rel}/importance.png)", ""]
        if r.get("search"):
            s = r["search"]
            lines += [f"Architecture chosen by search: candidate {s['index']} `{s['name']}` "
                      f"(table: [{r['name']}/search/search.md]({r['name']}/search/search.md))", ""]
    if resumed:
        lines += ["## Stage times (over all invocations; * this invocation)", "",
                  "| stage | seconds |", "|---|---|"]
        lines += [f"| {k}{'' if k in resumed else ' *'} | {v} |" for k, v in every.items()]
    elif summary.get("stage_seconds"):
        lines += ["## Stage times (this invocation)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in summary["stage_seconds"].items()]
    return write_markdown(out / "report.md", lines)

"""The short report.md each stage writes next to its output (pipeline and search write their own
larger reports; `minitron report` compares runs)."""

from __future__ import annotations

from pathlib import Path

from ..artifacts.metrics import METRICS
from ..artifacts.reports import write_markdown
from .judge import fmt_acc
from .plots import plot_training

AXES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


def prune_report(path, *, source_path, source, target, summary: dict, plots: list[str],
                 importance_mode: str) -> Path:
    """Source vs pruned architecture and parameter counts, what was dropped, the plots."""
    lines = ["# Pruning report", "", f"Source: `{source_path}`  ",
             f"Importance: {importance_mode}; calibration {summary.get('calibration_s', 0):.0f} s", "",
             "| | " + " | ".join(a.replace("_", " ") for a in AXES) + " | parameters | non-embedding |",
             "|---|" + "---|" * (len(AXES) + 2)]
    for name, arch, total, non_emb in (
            ("source", source, summary["source_params"], summary["source_non_embedding"]),
            ("pruned", target, summary["target_params"], summary["target_non_embedding"])):
        lines.append(f"| {name} | " + " | ".join(str(getattr(arch, a)) for a in AXES)
                     + f" | {total / 1e6:.2f}M | {non_emb / 1e6:.2f}M |")
    dropped = summary.get("dropped_layers") or []
    lines += ["", f"Dropped layers: {dropped if dropped else 'none'}  ",
              f"Kept: {summary['target_params'] / summary['source_params']:.1%} of the parameters.", ""]
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    return write_markdown(path, lines)


def training_report(run_dir, *, stage: str, result: dict, student: str, teacher: str | None,
                    student_params: int, teacher_params: int | None, tokens: int) -> Path:
    """Steps, tokens, final validation loss and the loss curves of a distill/finetune run."""
    run_dir = Path(run_dir)
    lines = [f"# {'Distillation' if stage == 'distill' else 'Training'} report", "",
             f"Student: `{student}` ({student_params / 1e6:.2f}M parameters)  "]
    if teacher:
        lines.append(f"Teacher: `{teacher}` ({teacher_params / 1e6:.2f}M parameters)  ")
    lines += [f"Steps: {result['steps']}, {tokens:,} training tokens  ",
              f"Final validation loss: {result['val_loss']:.4f}  ",
              f"Final student: `{result['final']}`", ""]
    if (run_dir / METRICS).is_file():
        plot_training(run_dir / METRICS, run_dir / "training.png", title=f"{stage}: loss")
        lines += ["![training](training.png)", ""]
    return write_markdown(run_dir / "report.md", lines)


def _num(x, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def evaluate_report(path, result: dict) -> Path:
    """Loss/perplexity and task accuracies of one evaluation, as Markdown."""
    lines = ["# Evaluation", "", f"Checkpoint: `{result.get('checkpoint')}`  ",
             f"Layout: {result.get('layout')}  ", "",
             "| held-out loss | perplexity | tokens |", "|---|---|---|",
             f"| {result['loss']:.4f} | {result['perplexity']:.2f} | {result['tokens']} |", ""]
    tasks = result.get("tasks", {}).get("results", {})
    if tasks:
        lines += ["| task | acc | acc_norm | items | acc_norm ± stderr | chance |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {t} | {r['acc']:.4f} | {r['acc_norm']:.4f} | {r['n']} | "
                  f"{fmt_acc(r['acc_norm'], r.get('acc_norm_stderr'))} | "
                  f"{_num(r.get('chance'))} |" for t, r in tasks.items()]
        lines += ["", "stderr: standard error of the accuracy over the items; chance: the accuracy "
                      "of guessing (mean of 1/choices)."]
        settings = result["tasks"].get("settings")
        if settings:
            lines += ["", f"Settings: {settings}"]
    return write_markdown(path, lines)

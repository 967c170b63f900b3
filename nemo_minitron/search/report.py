"""search.md and search.png: the candidate table of an architecture search."""

from __future__ import annotations

from pathlib import Path

from ..artifacts.reports import write_markdown, write_png
from ..report.plots import _plt


def _f(v, fmt="{:.3f}"):
    return "—" if v is None else fmt.format(v)


def plot_search(results: list[dict], path: Path, title: str = "") -> Path:
    plt = _plt()
    done = [r for r in results if r.get("val_loss") is not None]
    conf = [r for r in done if r.get("confirm_loss") is not None]
    fig, axes = plt.subplots(1, 2 if conf else 1, figsize=(12 if conf else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    names = [r["name"] for r in done]
    x = range(len(done))
    ax.bar([i - 0.2 for i in x], [r.get("pruned_loss") or 0 for r in done], width=0.4,
           color="tab:gray", label="pruned (before retraining)")
    ax.bar([i + 0.2 for i in x], [r["val_loss"] for r in done], width=0.4, color="tab:blue",
           label="after short distillation")
    ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="validation loss", title="Candidates, best first")
    lo = min(r["val_loss"] for r in done) if done else 0
    ax.set_ylim(bottom=max(0.0, lo - 0.5))
    ax.legend(fontsize=8)
    if conf:
        ax = axes[0, 1]
        ax.scatter([r["val_loss"] for r in conf], [r["confirm_loss"] for r in conf])
        for r in conf:
            ax.annotate(r["name"], (r["val_loss"], r["confirm_loss"]), fontsize=7)
        ax.set(xlabel="loss after short distillation", ylabel="loss after longer distillation",
               title="Does the short ranking hold?")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    write_png(path, fig)
    plt.close(fig)
    return path


def write_search_report(out: Path, summary: dict) -> Path:
    results = summary["results"]
    has_conf = any(r.get("confirm_loss") is not None for r in results)
    task_names = sorted({t for r in results for t in r.get("val_tasks", {})})
    lines = ["# Architecture search", "",
             f"Budget: {summary['budget']:g} "
             f"({'fraction of' if summary['budget'] <= 1 else 'absolute, source has'} "
             f"{summary['source_params'] / 1e6:.2f}M "
             f"{summary.get('count', 'total')}{'' if summary['count_embeddings'] else ' non-embedding'} "
             "parameters), "
             f"band ±{summary['tolerance']:.0%}.", ""]
    moe = any("active" in r for r in results)
    head = ["rank", "candidate", "layers", "hidden", "FFN", "heads/groups"]
    head += ["experts", "active"] if moe else []
    head += ["params", "non-emb.", "loss pruned", "loss short KD"]
    head += [f"{t} (acc_norm)" for t in task_names]
    if has_conf:
        head += ["loss longer KD", "rank longer KD"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        t = r["target"]
        row = [_f(r.get("rank"), "{}"), f"{r['index']}: `{r['name']}`", str(t["num_layers"]),
               str(t["hidden_size"]), str(t["ffn_hidden_size"]),
               f"{t['num_attention_heads']}/{t['num_query_groups']}"]
        row += [str(t["num_experts"]), f"{r['active'] / 1e6:.2f}M"] if moe else []
        row += [f"{r['params'] / 1e6:.2f}M", f"{r['non_embedding'] / 1e6:.2f}M",
                _f(r.get("pruned_loss")), "diverged" if "diverged" in r else _f(r.get("val_loss"))]
        row += [_f(r.get("val_tasks", {}).get(n)) for n in task_names]
        if has_conf:
            row += ["diverged" if "confirm_diverged" in r else _f(r.get("confirm_loss")),
                    _f(r.get("confirm_rank"), "{}")]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if summary.get("pending"):
        lines += [f"Pending (not yet distilled): {summary['pending']}.", ""]
    for key, what in (("diverged", "short"), ("confirm_diverged", "longer")):
        bad = [r for r in results if key in r]
        if bad:  # the guard's message says at which step and what to change
            lines += [f"Diverged in the {what} distillation (non-finite loss or gradients; not "
                      f"ranked there): candidates {[r['index'] for r in bad]}. Candidate "
                      f"{bad[0]['index']}: {bad[0][key]}", ""]
    for key, what in (("tau_pruned_vs_short", "loss before retraining vs after the short distillation"),
                      ("tau_short_vs_confirm", "short vs longer distillation (confirmed candidates)")):
        if key in summary:
            lines.append(f"Kendall's tau, {what}: {summary[key]:+.2f}  ")
    if summary.get("chosen"):
        c = summary["chosen"]
        lines += ["", f"**Chosen**: candidate {c['index']} `{c['name']}` "
                      f"({c['params'] / 1e6:.2f}M parameters), plan `{c['plan']}`.", ""]
    if any(r.get("val_loss") is not None for r in results):
        plot_search(results, out / "search.png")
        lines += ["![search](search.png)", ""]
    return write_markdown(out / "search.md", lines)

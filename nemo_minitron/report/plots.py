"""PNG plots of importance scores. matplotlib is imported here only, with the headless backend."""

from __future__ import annotations

from pathlib import Path

from ..artifacts.metrics import read_metrics
from ..artifacts.reports import write_png


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_importance(imp, path, *, dropped_layers=(), title: str = "") -> Path:
    """Per-layer Block Importance (dropped layers highlighted), mean neuron and head scores per
    layer, and the sorted hidden-channel scores."""
    plt = _plt()
    L = imp.block.numel()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    colors = ["tab:red" if i in set(dropped_layers) else "tab:blue" for i in range(L)]
    axes[0, 0].bar(range(L), imp.block.tolist(), color=colors)
    axes[0, 0].set(title="Block Importance (1 - cos) per layer; red = dropped", xlabel="layer")
    axes[0, 1].plot(imp.ffn.mean(1).tolist(), marker="o", label="MLP neurons (mean)")
    axes[0, 1].plot(imp.heads.mean(1).tolist(), marker="s", label="attention heads (mean)")
    axes[0, 1].set(title="Width importance per layer", xlabel="layer")
    axes[0, 1].legend()
    h = imp.hidden.sort(descending=True).values
    axes[1, 0].plot(h.tolist())
    axes[1, 0].set(title="Hidden channels, sorted", xlabel="rank", yscale="log")
    im = axes[1, 1].imshow(imp.heads.T.tolist(), aspect="auto", cmap="viridis")
    axes[1, 1].set(title="Head importance", xlabel="layer", ylabel="head")
    fig.colorbar(im, ax=axes[1, 1])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    write_png(path, fig)
    plt.close(fig)
    return Path(path)


def plot_depth_curve(values, n: int, path, ylabel: str = "validation loss") -> Path:
    """Validation loss (lower is better) or accuracy (higher) after removing layers [s, s+n)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(range(len(values)), values, marker="o")
    better = min if "loss" in ylabel else max
    best = better(range(len(values)), key=lambda s: values[s])
    ax.scatter([best], [values[best]], color="tab:red", zorder=3, label=f"removed: {best}..{best + n - 1}")
    ax.set(title=f"{ylabel} with {n} contiguous layers removed", xlabel="first removed layer",
           ylabel=ylabel)
    ax.legend()
    fig.tight_layout()
    write_png(path, fig)
    plt.close(fig)
    return Path(path)


def plot_training(metrics_jsonl, path, title: str = "") -> Path:
    """Training loss terms per step and validation loss from a run's metrics.jsonl."""
    rows = read_metrics(metrics_jsonl)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    for key, style in (("loss", "-"), ("kd", "--"), ("lm", ":")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), style, label=f"train {key}")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", color="black", label="validation loss")
    ax.set(xlabel="step", ylabel="loss", title=title or "training")
    ax.legend()
    fig.tight_layout()
    write_png(path, fig)
    plt.close(fig)
    return Path(path)


def plot_loss_curves(curves, path, title: str = "loss curves") -> Path:
    """Training loss (lines) and validation loss (markers) of several runs on one set of axes,
    one colour per run. ``curves``: ``(label, rows)`` pairs, rows as in a metrics.jsonl."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, rows) in enumerate(curves):
        c = colors[i % len(colors)]
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        if train:
            ax.plot(*zip(*train), "-", color=c, alpha=0.8, label=f"{label}: train")
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if val:
            ax.plot(*zip(*val), "o--", color=c, label=f"{label}: validation")
    ax.set(xlabel="step", ylabel="loss", title=title)
    if curves:
        ax.legend(fontsize="small")
    fig.tight_layout()
    write_png(path, fig)
    plt.close(fig)
    return Path(path)

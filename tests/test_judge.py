"""Reports people can judge: chance level, standard errors and retained above-chance accuracy in
the evaluate, pipeline and `minitron report` outputs. Fixtures are results written by the
project's own scorer (`multiple_choice.accuracy`) from items with known answers."""

import math

import pytest
import torch

from nemo_minitron.artifacts.evaluation import write_eval
from nemo_minitron.report import judge
from nemo_minitron.evaluate.multiple_choice import accuracy
from nemo_minitron.evaluate.tasks import Item, load_task
from nemo_minitron.report.compare import write_comparison
from nemo_minitron.report.pipeline import write_report
from nemo_minitron.report.stages import evaluate_report



def table(md: str) -> list[dict]:
    """Rows of every Markdown table in ``md`` as {header: cell}, each under its own header."""
    rows, head = [], None
    for line in md.splitlines() + [""]:
        if not line.startswith("|"):
            head = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if head is None:
            head = cells
        elif not set(line) <= set("|-"):
            rows.append(dict(zip(head, cells)))
    return rows


def scored(right: list[bool], choices: list[int]) -> dict:
    """accuracy() of items with ``choices[i]`` equal-length options, answered right or wrong."""
    items, scores = [], []
    for ok, k in zip(right, choices):
        label = len(items) % k
        items.append(Item("q", [f" {chr(97 + j)}" for j in range(k)], label))
        pick = label if ok else (label + 1) % k
        scores.append([0.0 if j == pick else -1.0 for j in range(k)])
    return accuracy(items, scores)


def result(tasks: dict, loss=3.0) -> dict:
    """A `minitron evaluate` results dict: {task: (number right, items, choices per item)}."""
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": 4096,
            "tasks": {"results": {t: scored([i < k for i in range(n)], [c] * n)
                                  for t, (k, n, c) in tasks.items()}, "settings": {}}}


# teacher / pruned / distilled on a 4-choice and a 2-choice task, 40 items each
EVALS = {"teacher": result({"arc_easy": (26, 40, 4), "piqa": (30, 40, 2)}, 2.9),
         "pruned": result({"arc_easy": (8, 40, 4), "piqa": (18, 40, 2)}, 9.5),
         "distilled": result({"arc_easy": (18, 40, 4), "piqa": (25, 40, 2)}, 4.1)}


def test_accuracy_records_stderr_and_chance():
    r = scored([True] * 3 + [False] * 5, [4, 4, 5, 3, 2, 4, 4, 4])
    assert (r["acc_norm"], r["n"]) == (3 / 8, 8)
    assert r["acc_norm_stderr"] == pytest.approx(math.sqrt(3 / 8 * 5 / 8 / 7))
    assert r["chance"] == pytest.approx((5 / 4 + 1 / 5 + 1 / 3 + 1 / 2) / 8)
    assert judge.retained(0.5, 0.75, 0.25) == pytest.approx(0.5)
    assert judge.retained(0.2, 0.75, 0.25) == pytest.approx(-0.1)  # below chance: negative
    assert judge.retained(0.4, 0.25, 0.25) is None  # teacher at chance: nothing to retain


def test_chance_of_the_real_tasks():
    """From the shipped data: PIQA has two solutions, HellaSwag four endings, ARC 3-5 options."""
    assert scored([True] * 5, [len(it.choices) for it in load_task("piqa", limit=5)])["chance"] == 0.5
    assert judge.chance([len(it.choices) for it in load_task("hellaswag", limit=5)]) == 0.25
    arc = [len(it.choices) for it in load_task("arc_easy", limit=300)]
    assert set(arc) <= {3, 4, 5} and judge.chance(arc) == pytest.approx(sum(1 / k for k in arc) / 300)


def test_task_rows_retained_ratio():
    rows = {r["task"]: r for r in judge.task_rows(EVALS)}
    arc, piqa = rows["arc_easy"], rows["piqa"]
    assert (arc["chance"], piqa["chance"], arc["n"]) == (0.25, 0.5, 40)
    # (18/40 - 1/4) / (26/40 - 1/4) = 0.2 / 0.4; (25/40 - 1/2) / (30/40 - 1/2) = 0.125 / 0.25
    assert arc["retained"]["distilled"] == pytest.approx(0.5)
    assert piqa["retained"]["distilled"] == pytest.approx(0.5)
    assert arc["retained"]["pruned"] == pytest.approx((0.2 - 0.25) / 0.4)
    assert "teacher" not in arc["retained"]
    assert judge.mean_retained(list(rows.values()), "pruned") == pytest.approx(
        ((0.2 - 0.25) / 0.4 + (0.45 - 0.5) / 0.25) / 2)
    assert piqa["stderr"]["teacher"] == pytest.approx(math.sqrt(0.75 * 0.25 / 39))


def err(p: float, n: int = 40) -> float:
    return math.sqrt(p * (1 - p) / (n - 1))


def rse(s: float, t: float, c: float) -> float:
    """First-order standard error of (s - c) / (t - c) over 40 items each."""
    return math.sqrt(err(s) ** 2 + ((s - c) / (t - c) * err(t)) ** 2) / (t - c)


def test_retained_stderr_matches_resampling():
    """The ratio's first-order error against its spread over 4000 independent draws of both
    accuracies (binomial, 300 items, a teacher 0.15 above chance, as on the embedded default)."""
    gen = torch.Generator().manual_seed(0)
    n, c, pt, ps = 300, 0.25, 0.40, 0.32
    t = torch.binomial(torch.full((4000,), float(n)), torch.full((4000,), pt), generator=gen) / n
    s = torch.binomial(torch.full((4000,), float(n)), torch.full((4000,), ps), generator=gen) / n
    spread = ((s - c) / (t - c)).std().item()
    got = judge.retained_stderr(ps, judge.stderr(ps, n), pt, judge.stderr(pt, n), c)
    assert got == pytest.approx(spread, rel=0.15)
    assert 0.15 < got < 0.3  # what makes 300 items a coarse measure of retention
    assert judge.retained_stderr(0.3, None, 0.4, 0.02, 0.25) is None
    assert judge.retained_stderr(0.3, 0.02, 0.25, 0.02, 0.25) is None  # teacher at chance


def test_mean_retained_stderr():
    rows = judge.task_rows(EVALS)
    one = [rse(18 / 40, 26 / 40, 0.25), rse(25 / 40, 30 / 40, 0.5)]
    by = {r["task"]: r for r in rows}
    assert by["arc_easy"]["retained_stderr"]["distilled"] == pytest.approx(one[0])
    assert judge.mean_retained_stderr(rows, "distilled") == pytest.approx(
        math.sqrt(one[0] ** 2 + one[1] ** 2) / 2)
    assert judge.mean_retained_stderr(rows, "teacher") is None
    assert judge.fmt_ratio(0.354, 0.1049) == "0.35 ± 0.10"


def test_evaluate_report_shows_stderr_and_chance(tmp_path):
    r = EVALS["distilled"]
    text = evaluate_report(tmp_path / "report.md", r).read_text()
    rows = {x["task"]: x for x in table(text) if "task" in x}
    err = math.sqrt(0.45 * 0.55 / 39)
    assert rows["arc_easy"]["acc_norm ± stderr"] == f"0.450 ± {err:.3f}"
    assert (rows["arc_easy"]["chance"], rows["piqa"]["chance"]) == ("0.250", "0.500")


def test_pipeline_report_shows_retained(tmp_path):
    summary = {"teacher": "t", "seconds": 100.0, "rounds": [{
        "name": "round1", "arch": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
                                   "num_attention_heads": 4, "num_query_groups": 2, "head_dim": 16},
        "params": {"teacher": 2e6, "student": 1e6},
        "val_loss": {k: v["loss"] for k, v in EVALS.items()},
        "task_table": judge.task_rows(EVALS)}]}
    text = write_report(tmp_path, summary).read_text()
    rows = [r for r in table(text) if "retained (distilled)" in r]
    by = {r["task"]: r for r in rows}
    assert by["arc_easy"]["retained (distilled)"] == f"0.50 ± {rse(18 / 40, 26 / 40, 0.25):.2f}"
    assert by["piqa"]["teacher acc_norm"] == f"0.750 ± {math.sqrt(0.75 * 0.25 / 39):.3f}"
    assert by["piqa"]["chance"] == "0.50"
    mean_err = judge.mean_retained_stderr(summary["rounds"][0]["task_table"], "distilled")
    assert by["**mean**"]["retained (distilled)"] == f"**0.50 ± {mean_err:.2f}**"
    assert by["**mean**"]["retained (pruned)"].startswith("**-0.16 ± ")  # (-0.125 - 0.2) / 2


def apart(acc_right: int, norm_right: int, n: int, k: int = 4) -> dict:
    """accuracy() of ``n`` items on which ``acc`` gets ``acc_right`` and ``acc_norm``
    ``norm_right <= acc_right`` right: between the two counts the answer is a short option that
    wins on the sum of log-probs but loses per character to a long distractor."""
    items, scores = [], []
    for i in range(n):
        label, long = i % k, (i + 1) % k
        items.append(Item("q", [" " + "x" * 9 if j == long else f" {chr(97 + j)}"
                                for j in range(k)], label))
        right, wrong = (-1.0, -10.0) if i < acc_right else (-10.0, -1.0)
        far = -2.0 if norm_right <= i < acc_right else wrong
        scores.append([right if j == label else far if j == long else -10.0 for j in range(k)])
    return accuracy(items, scores)


def test_pipeline_report_shows_retained_on_plain_acc(tmp_path):
    """acc and acc_norm can disagree on a small model; the report gives the ratio on both."""
    evals = {who: {"loss": 3.0, "tasks": {"results": {"arc_easy": apart(a, m, 40)}}}
             for who, (a, m) in {"teacher": (32, 26), "distilled": (25, 18)}.items()}
    assert (evals["distilled"]["tasks"]["results"]["arc_easy"]["acc"],
            evals["distilled"]["tasks"]["results"]["arc_easy"]["acc_norm"]) == (25 / 40, 18 / 40)
    summary = {"teacher": "t", "seconds": 1.0, "rounds": [{
        "name": "round1", "arch": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
                                   "num_attention_heads": 4, "num_query_groups": 2, "head_dim": 16},
        "params": {"teacher": 2e6, "student": 1e6}, "val_loss": {"teacher": 3.0, "pruned": 4.0,
                                                                "distilled": 3.5},
        "task_table": judge.task_rows(evals), "task_table_acc": judge.task_rows(evals, "acc")}]}
    text = write_report(tmp_path, summary).read_text()
    by = {r["task"]: r for r in table(text) if "task" in r}
    # (0.45 - 0.25) / (0.65 - 0.25)
    assert by["arc_easy"]["retained (distilled)"] == f"0.50 ± {rse(18 / 40, 26 / 40, 0.25):.2f}"
    # (0.625 - 0.25) / (0.8 - 0.25) = 0.68 on acc
    acc_err = rse(25 / 40, 32 / 40, 0.25)
    assert "Retained on plain acc (no length normalisation): distilled arc_easy 0.68, mean " \
           f"**0.68 ± {acc_err:.2f}**." in text


def test_minitron_report_task_table(tmp_path):
    rd = tmp_path / "pipe" / "round1"
    rd.mkdir(parents=True)
    for who, r in EVALS.items():
        write_eval(rd / f"eval_{who}.json", r)
    md, _ = write_comparison([str(tmp_path / "pipe")], tmp_path / "cmp.md")
    text = md.read_text()
    assert "## Downstream tasks" in text
    tasks = [r for r in table(text) if "retained" in r]
    by = {r["task"]: r for r in tasks}
    assert by["arc_easy"]["acc_norm (final)"] == f"0.450 ± {math.sqrt(0.45 * 0.55 / 39):.3f}"
    pair = [rse(18 / 40, 26 / 40, 0.25), rse(25 / 40, 30 / 40, 0.5)]
    assert (by["arc_easy"]["retained"], by["piqa"]["retained"], by["**mean**"]["retained"]) == \
        (f"0.50 ± {pair[0]:.2f}", f"0.50 ± {pair[1]:.2f}",
         f"**0.50 ± {math.sqrt(pair[0] ** 2 + pair[1] ** 2) / 2:.2f}**")
    assert by["piqa"]["acc_norm (pruned)"].startswith("0.450 ± ")

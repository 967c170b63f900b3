"""`minitron report`: runs side by side, from synthetic run directories with known numbers."""

import json

import pytest

from nemo_minitron.arch import Arch
from nemo_minitron.artifacts.evaluation import write_eval
from nemo_minitron.artifacts.metrics import append_metrics
from nemo_minitron.artifacts.pipeline_files import write_summary
from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.report.compare import load_run, write_comparison

from tests.helpers import minitron

ARCH = Arch(num_layers=4, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
            num_query_groups=2, head_dim=32, vocab_size=1000)


def write_jsonl(path, rows):
    """A metrics.jsonl as the training logger appends it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            append_metrics(f, r["step"], {k: v for k, v in r.items() if k != "step"})


def eval_json(loss, tasks=None, **extra):
    out = {"loss": loss, "perplexity": 2.718 ** loss, "tokens": 4096, **extra}
    if tasks:
        out["tasks"] = {"results": {t: {"acc": a - 0.01, "acc_norm": a, "n": 100}
                                    for t, a in tasks.items()}, "settings": {}}
    return out


def curve(n, start, val_every=5, final_val=None):
    rows = [{"step": s, "loss": start - 0.1 * s, "kd": start - 0.1 * s, "lr": 1e-4}
            for s in range(1, n + 1)]
    for r in rows:
        if r["step"] % val_every == 0 and r["step"] < n:
            r["val_loss"] = r["loss"] + 0.05
    if final_val is not None:
        rows.append({"step": n, "val_loss": final_val})
    return rows


def make_pipeline(root):
    """One finished round with summary.json (parameters, losses, tasks, wall time)."""
    rd = root / "round1"
    rd.mkdir(parents=True)
    write_eval(rd / "eval_teacher.json", eval_json(2.5, {"arc_easy": 0.55, "piqa": 0.65}))
    write_eval(rd / "eval_pruned.json", eval_json(5.125, {"arc_easy": 0.30, "piqa": 0.52}))
    write_eval(rd / "eval_distilled.json", eval_json(3.25, {"arc_easy": 0.45, "piqa": 0.6}))
    write_jsonl(rd / "distill" / "metrics.jsonl", curve(10, 4.0, final_val=3.25))
    summary = {"teacher": "ckpt/teacher", "seconds": 900.0, "stage_seconds": {},
               "rounds": [{"name": "round1", "params": {"teacher": 134_515_008, "student": 70_000_000},
                           "val_loss": {"teacher": 2.5, "pruned": 5.125, "distilled": 3.25},
                           "tasks": {"teacher": {"arc_easy": 0.55, "piqa": 0.65},
                                     "distilled": {"arc_easy": 0.45, "piqa": 0.6}}}]}
    write_summary(root, summary)
    return root


def make_distill(root):
    """A distill run: metrics.jsonl (with a resumed stretch that re-logs steps 7-8) and final/."""
    rows = curve(8, 5.0) + curve(12, 5.0, final_val=3.75)[6:]
    write_jsonl(root / "metrics.jsonl", rows)
    (root / "final").mkdir()
    ckpt.write_meta(root / "final", ARCH, {}, {"stage": "distill", "parent": "ckpt/pruned"})
    return root


def table(md):
    """The Markdown table as a list of {header: cell}."""
    lines = [x for x in md.splitlines() if x.startswith("|")]
    split = lambda x: [c.strip() for c in x.strip("|").split("|")]  # noqa: E731
    head = split(lines[0])
    return [dict(zip(head, split(x))) for x in lines[2:]]


def check_png(path):
    from PIL import Image

    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 200


def test_table_and_plot(tmp_path):
    pipe = make_pipeline(tmp_path / "pipe")
    kd = make_distill(tmp_path / "kd")
    ev = tmp_path / "eval_results.json"
    write_eval(ev, eval_json(3.5, {"piqa": 0.625, "hellaswag": 0.3125}, seconds=42.0,
                             checkpoint=str(kd / "final")))
    md, png = write_comparison([str(pipe), str(kd), str(ev)], tmp_path / "out" / "cmp.md")
    assert md == tmp_path / "out" / "cmp.md" and png == tmp_path / "out" / "cmp.png"
    text = md.read_text()
    rows = table(text)
    assert [r["run"] for r in rows] == [str(pipe), str(kd), str(ev)]
    assert list(rows[0]) == ["run", "kind", "parameters", "val loss (teacher)", "val loss (pruned)",
                             "val loss (final)", "arc_easy (acc_norm)", "hellaswag (acc_norm)",
                             "piqa (acc_norm)", "wall time"]
    p, k, e = rows
    assert (p["kind"], p["parameters"], p["val loss (teacher)"], p["val loss (pruned)"],
            p["val loss (final)"]) == ("pipeline", "70.0M", "2.5000", "5.1250", "3.2500")
    assert (p["arc_easy (acc_norm)"], p["piqa (acc_norm)"], p["hellaswag (acc_norm)"]) == \
        ("0.450", "0.600", "—")
    assert p["wall time"] == "15.0 min"
    n_kd = ARCH.num_params()
    assert (k["kind"], k["parameters"], k["val loss (final)"]) == \
        ("distill", f"{n_kd / 1e6:.1f}M", "3.7500")
    assert k["val loss (teacher)"] == k["val loss (pruned)"] == k["piqa (acc_norm)"] == "—"
    assert k["wall time"] == "—"
    assert (e["kind"], e["parameters"], e["val loss (final)"], e["piqa (acc_norm)"],
            e["hellaswag (acc_norm)"], e["wall time"]) == \
        ("evaluate", f"{n_kd / 1e6:.1f}M", "3.5000", "0.625", "0.312", "42 s")
    assert "![loss curves](cmp.png)" in text
    check_png(png)
    # curves: one per training run, steps once each even after a resume
    kd_curve = load_run(kd)[0].curves[0][1]
    assert [r["step"] for r in kd_curve] == list(range(1, 13))
    assert kd_curve[-1]["val_loss"] == 3.75


def test_interrupted_pipeline_reports_its_rounds(tmp_path):
    """No summary.json yet: the rounds that have evaluations or metrics, in natural order."""
    root = tmp_path / "pipe"
    for name, loss in (("round10", 3.0), ("round2", 3.5)):
        (root / name).mkdir(parents=True)
        write_eval(root / name / "eval_distilled.json", eval_json(loss))
    write_jsonl(root / "round1" / "distill" / "metrics.jsonl", curve(4, 4.0))  # distilling now
    rows = load_run(root)
    assert [r.run for r in rows] == [f"{root} [round1]", f"{root} [round2]", f"{root} [round10]"]
    assert [r.val_loss.get("final") for r in rows] == [None, 3.5, 3.0]
    assert rows[0].curves and not rows[1].curves


def test_evaluate_only_runs_have_no_png(tmp_path):
    ev = tmp_path / "a.json"
    write_eval(ev, eval_json(3.0))
    md, png = write_comparison([str(ev)], tmp_path / "r.md")
    assert png is None and not (tmp_path / "r.png").exists()
    assert table(md.read_text())[0]["val loss (final)"] == "3.0000"


def test_unknown_run_names_the_path(tmp_path):
    bogus = tmp_path / "not_a_run"
    bogus.mkdir()
    (bogus / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=f"{bogus} is neither kind of run.*metrics.jsonl"):
        load_run(bogus)
    with pytest.raises(ValueError, match="does not exist"):
        load_run(tmp_path / "missing")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a `minitron evaluate` results file"):
        load_run(other)


def test_cli(tmp_path):
    pipe = make_pipeline(tmp_path / "pipe")
    kd = make_distill(tmp_path / "kd")
    p = minitron("report", str(pipe), str(kd), cwd=tmp_path)  # default output in the cwd
    assert p.returncode == 0, p.stderr
    assert {r["run"] for r in table((tmp_path / "report_compare.md").read_text())} == {str(pipe), str(kd)}
    check_png(tmp_path / "report_compare.png")
    p = minitron("report", "pipe", "kd", "output=sub/c.md", cwd=tmp_path)  # Hydra-style output=
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "sub" / "c.md").is_file() and (tmp_path / "sub" / "c.png").is_file()
    (tmp_path / "bogus").mkdir()
    p = minitron("report", "pipe", "bogus", cwd=tmp_path)
    assert p.returncode == 2
    assert "minitron report: error: bogus is neither kind of run" in p.stderr
    assert "Traceback" not in p.stderr
    p = minitron("report", "--help", cwd=tmp_path)
    assert p.returncode == 0 and "RUN" in p.stdout and "output=" in p.stdout


def test_help_example_reads_where_evaluate_writes():
    """The --help example names a results JSON at the path `minitron evaluate` gives one."""
    import re
    from pathlib import Path

    from nemo_minitron.cli.report import EPILOG
    from nemo_minitron.evaluate.run import default_output

    example = Path(re.search(r"outputs/\S+\.json", EPILOG)[0])
    written = default_output()
    assert example.parts[:2] == written.parts[:2] and example.name == written.name, EPILOG
    stamp = r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d"
    assert re.fullmatch(stamp, example.parts[2]) and re.fullmatch(stamp, written.parts[2])

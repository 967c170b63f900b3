"""`minitron report RUN [RUN ...]`: compare runs side by side (Markdown table + loss-curve PNG).

Not a Hydra app: it takes paths as positional arguments (plain argparse); ``output=FILE.md``
is accepted in Hydra's spelling as well as ``--output FILE.md``.
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """Compare runs side by side: one Markdown table (parameters, validation loss of the
teacher / pruned / final model, downstream acc_norm, wall time) and a PNG overlaying the training
and validation loss curves of every run (written next to the Markdown, same name, .png).

A RUN is a pipeline run directory (summary.json, round*/eval_*.json, round*/distill/metrics.jsonl;
one row per round), a distill or finetune run directory (metrics.jsonl, final/), or a results JSON
written by `minitron evaluate` (or a directory holding eval_results.json)."""

EPILOG = """examples:
  minitron report runs/pipeline runs/pipeline_depth
  minitron report runs/smol_half_kd runs/smol_half_random_kd output=compare/kd.md
  minitron report runs/pipeline outputs/evaluate/2025-01-01_12-00-00/eval_results.json -o cmp.md"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minitron report", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directory or evaluate results JSON")
    p.add_argument("-o", "--output", default="report_compare.md",
                   help="Markdown file to write (default: %(default)s); also output=FILE.md")
    return p


def main(argv: list[str] | None = None):
    from ..artifacts.atomic import check_output_place
    from ..report.compare import write_comparison

    args = list(sys.argv[1:] if argv is None else argv)
    args = [x for a in args for x in (["--output", a[len("output="):]]
                                      if a.startswith("output=") else [a])]
    ns = parser().parse_args(args)
    try:
        check_output_place(ns.output, "file", "report.md")  # before the plot is written beside it
        md, png = write_comparison(ns.runs, ns.output)
    except (ValueError, OSError) as e:  # bad runs; an output path that cannot be written
        print(f"minitron report: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"report: {md}" + (f"\nloss curves: {png}" if png else ""))
    return md

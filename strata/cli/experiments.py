"""``strata sweep`` and ``strata report``: grids of runs matched by a budget, and their tables and plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from strata.cli.arguments import positive_int


def add_parsers(commands) -> None:
    sweep = commands.add_parser("sweep", help="run a sweep file's grid of runs, matched by a budget, and evaluate them")
    sweep.add_argument("sweep", metavar="SWEEP.yaml")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every run, e.g. data.sources=[DIR]")
    sweep.add_argument("--size", help="one of the sweep's sizes (default: the first it lists)")
    sweep.add_argument("--out", help="sweep folder (default sweeps/<file name>-<size>)")
    sweep.add_argument("--jobs", type=positive_int, default=1, help="runs at a time, each its own process (default 1)")
    sweep.add_argument("--dry-run", action="store_true", help="print the runs with their costs and steps; train nothing")
    sweep.set_defaults(handler=run_sweep)

    report = commands.add_parser("report", help="tables (Markdown, CSV) and plots of sweeps or runs")
    report.add_argument("dirs", nargs="+", metavar="SWEEP_OR_RUN_DIR")
    report.add_argument("--context", type=positive_int, default=8192, help="context for the cache column (default 8192)")
    report.add_argument("--out", help="folder for report.md, report.csv and plots (default: the one sweep given, else ./report)")
    report.set_defaults(handler=run_report)


def run_sweep(args: argparse.Namespace) -> int:
    from strata.experiments.sweep import run_sweep as sweep

    return sweep(args.sweep, args.size, args.out, args.jobs, args.dry_run, args.overrides)


def run_report(args: argparse.Namespace) -> int:
    out = Path(args.out or (args.dirs[0] if len(args.dirs) == 1 else "report"))
    return write_and_print_report(args.dirs, out, args.context)


def write_and_print_report(dirs: list[str], out: Path, context: int) -> int:
    from rich.console import Console

    from strata.experiments.report import collect, print_report, write_report

    report = collect(dirs, context)
    for title, outcome in write_report(report, out).items():
        if not outcome.endswith(".png"):
            print(f"{title}: skipped, {outcome}", file=sys.stderr)
    # Piped or redirected output gets a wide table instead of rich's 80 columns, which would fold
    # every cell of a sweep's table into a column of single characters.
    print_report(Console(width=None if sys.stdout.isatty() else 200), report, out)
    return 0

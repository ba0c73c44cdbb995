"""Readable terminal tables for ``strata eval`` (rich), from the records the suite saved."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def _titled(console: Console, title: str) -> Table:
    """A table whose title is printed above it as a line of its own: a title inside the table would
    wrap at the width of a narrow table (a heat map of two columns)."""
    console.print(f"[bold]{title}[/bold]")
    return Table()


def print_report(console: Console, checkpoint, report: dict, shots: int) -> None:
    if "heldout" in report:
        result = report["heldout"]["result"]
        table = _titled(console, f"held-out text — {checkpoint}")
        for column, justify in (("file", "left"), ("bytes", "right"), ("bits/byte", "right"), ("bits/char", "right")):
            table.add_column(column, justify=justify)
        for row in result["files"]:
            table.add_row(row["file"], f"{row['bytes']:,}", f"{row['bpb']:.4f}", f"{row['bpc']:.4f}")
        table.add_row("[bold]overall[/bold]", f"{result['bytes']:,}", f"[bold]{result['bpb']:.4f}[/bold]",
                      f"[bold]{result['bpc']:.4f}[/bold]")
        console.print(table)
    tasks = {name.removeprefix("task-"): record["result"] for name, record in report.items() if name.startswith("task-")}
    if tasks:
        table = _titled(console, f"multiple choice, {shots}-shot — {checkpoint}")
        table.add_column("task")
        for column in ("n", "acc", "acc_norm", "acc_bytes"):
            table.add_column(column, justify="right")
        for name, task in tasks.items():
            table.add_row(name, f"{task['n']:,}", *(f"{task[metric]:.4f} ± {task[f'{metric}_stderr']:.4f}"
                                                    for metric in ("acc", "acc_norm", "acc_bytes")))
        console.print(table)
    if "long_context" in report:
        result = report["long_context"]["result"]
        table = _titled(console, f"loss by position, windows of {result['length']:,} tokens (trained at "
                                 f"{result['train_length']:,}), {result['protocol']} protocol — plot: {result['plot']}")
        for column in ("positions", "bits/byte", "nats/token"):
            table.add_column(column, justify="right")
        for bucket in result["buckets"]:
            beyond = " (beyond training)" if bucket["start"] >= result["train_length"] else ""
            table.add_row(f"{bucket['start']}-{bucket['end'] - 1}{beyond}", f"{bucket['bpb']:.4f}",
                          f"{bucket['nats_per_token']:.4f}")
        console.print(table)
    if "languages" in report:
        result = report["languages"]["result"]
        table = _titled(console, f"languages — plot: {result['plot']}")
        for column, justify in (("language", "left"), ("bits/byte", "right"), ("bits/char", "right")):
            table.add_column(column, justify=justify)
        for row in sorted(result["languages"], key=lambda row: row["bpc"]):
            table.add_row(f"{row['name']} ({row['code']})", f"{row['bpb']:.3f}", f"{row['bpc']:.3f}")
        table.add_row("[bold]mean[/bold]", f"{result['mean_bpb']:.3f}", f"{result['mean_bpc']:.3f}")
        console.print(table)
    for name in ("needle", "passkey"):
        if name in report:
            result = report[name]["result"]
            table = _titled(console, f"{name}: accuracy by depth (rows) and length in tokens (columns), mean "
                                     f"{result['mean']:.2f}, {result['protocol']} protocol — plot: {result['plot']}")
            table.add_column("depth")
            for length in result["lengths"]:
                table.add_column(f"{length:,}", justify="right")
            for depth, row in zip(result["depths"], result["accuracy"], strict=True):
                table.add_row(f"{depth:.0%}", *(f"{value:.2f}" for value in row))
            console.print(table)
    if "characters" in report:
        result = report["characters"]["result"]
        table = _titled(console, f"character tasks, {result['shots']}-shot, exact match of the answer line")
        for column, justify in (("task", "left"), ("n", "right"), ("acc", "right"), ("chance", "right")):
            table.add_column(column, justify=justify)
        for name, row in result["tasks"].items():
            table.add_row(name, f"{row['n']:,}", f"{row['acc']:.3f} ± {row['acc_stderr']:.3f}", f"{row['chance']:.2f}")
        average = result["average"]
        table.add_row("[bold]average[/bold]", "", f"[bold]{average['acc']:.3f}[/bold] ± {average['acc_stderr']:.3f}",
                      f"{average['chance']:.2f}")
        console.print(table)
    console.print(f"saved in {Path(checkpoint).parent.parent / 'evals'}/")

"""Where evaluations go: ``RUN/evals/<name>.json`` and ``<name>.md`` (and plots beside them), and
the table ``strata eval --compare`` builds across runs from those files.

Each JSON file is ``{"evaluation", "checkpoint", "headline": {metric: number}, "result": {...}}``:
``headline`` holds the few numbers a comparison table shows (bits per byte, accuracies, ...),
``result`` everything the evaluation measured. Files are written whole under a temporary name and
renamed, so a comparison never reads half a result.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from strata.files import write_atomically

EVALS = "evals"


def evals_dir(run_dir: Path) -> Path:
    folder = Path(run_dir) / EVALS
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_evaluation(run_dir: Path, name: str, checkpoint: str, headline: dict[str, float], result: dict,
                    markdown: str) -> Path:
    """Write ``name.json`` and ``name.md`` into ``RUN/evals/``; return the JSON path."""
    folder = evals_dir(run_dir)
    record = {"evaluation": name, "checkpoint": checkpoint, "headline": headline, "result": result}
    write_atomically(folder / f"{name}.json", json.dumps(record, indent=1) + "\n")
    write_atomically(folder / f"{name}.md", f"# {name}\n\n{checkpoint}\n\n{markdown}\n")
    return folder / f"{name}.json"


def load_evaluations(run_dir: Path) -> dict[str, dict]:
    """Every evaluation record saved in ``RUN/evals/``, by name."""
    folder = Path(run_dir) / EVALS
    records = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            records[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: unreadable evaluation record ({error})") from None
    return records


def comparison(run_dirs: list[Path]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """(metric names in a stable order, {run: {metric: value}}) over every headline of every run;
    a metric is named ``evaluation/metric``."""
    table: dict[str, dict[str, float]] = {}
    metrics: list[str] = []
    for run_dir in run_dirs:
        records = load_evaluations(run_dir)
        if not records:
            raise ValueError(f"{run_dir}: no evaluations saved (run `strata eval {run_dir} ...` first)")
        row = table.setdefault(str(run_dir), {})
        for name, record in records.items():
            for metric, value in record["headline"].items():
                key = f"{name}/{metric}"
                row[key] = value
                if key not in metrics:
                    metrics.append(key)
    return metrics, table


def comparison_markdown(metrics: list[str], table: dict[str, dict[str, float]]) -> str:
    header = "| run | " + " | ".join(metrics) + " |"
    rule = "|---|" + "---|" * len(metrics)
    rows = [f"| {run} | " + " | ".join(_cell(values.get(metric)) for metric in metrics) + " |" for run, values in table.items()]
    return "\n".join([header, rule, *rows])


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def plot_comparison(metrics: list[str], table: dict[str, dict[str, float]], path: Path) -> None:
    """One small bar chart per metric, a bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False)
    runs = list(table)
    labels = [Path(run).name for run in runs]
    for index, metric in enumerate(metrics):
        axis = axes[index // columns][index % columns]
        values = [table[run].get(metric, math.nan) for run in runs]
        axis.bar(range(len(runs)), values, color=[f"C{i}" for i in range(len(runs))])
        axis.set_xticks(range(len(runs)), labels, rotation=20, fontsize=8, ha="right")
        axis.set_title(metric, fontsize=9)
        axis.grid(True, axis="y", alpha=0.3)
    for index in range(len(metrics), rows * columns):
        axes[index // columns][index % columns].axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_comparison(run_dirs: list[Path], out: Path) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Write ``comparison.md``, ``comparison.json`` and ``comparison.png`` into ``out``, plus the
    curves that several runs share (loss by position, bits per character by language)."""
    metrics, table = comparison(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "comparison.md", comparison_markdown(metrics, table) + "\n")
    write_atomically(out / "comparison.json", json.dumps(table, indent=1) + "\n")
    plot_comparison(metrics, table, out / "comparison.png")
    records = {Path(run).name: load_evaluations(run) for run in run_dirs}
    long = {name: r["long_context"]["result"] for name, r in records.items() if "long_context" in r}
    if long:
        from strata.evals.long_context import plot_loss_by_position

        plot_loss_by_position(long, out / "loss_by_position.png", {name: r["train_length"] for name, r in long.items()})
    languages = {name: r["languages"]["result"] for name, r in records.items() if "languages" in r}
    if languages:
        from strata.evals.languages import plot_languages

        plot_languages(languages, out / "languages.png")
    return metrics, table

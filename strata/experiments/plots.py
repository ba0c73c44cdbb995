"""The plots of ``strata report``, each a PNG drawn on a bare matplotlib ``Figure`` (no display):

- ``quality_vs_flops.png``: validation bits per byte (MQAR runs: held-out recall) against
  training FLOPs, a curve per run;
- ``quality_vs_decode.png``: validation bpb (or MQAR recall) against decode tokens/s, the Pareto
  front (no other run both faster and better) joined and starred;
- ``cache_vs_context.png``: inference cache against context length, from the cost model;
- ``mqar.png``: recall against key-value pairs, per run and length;
- ``needle.png``: needle / passkey accuracy against context length (mean over depths), per run;
- ``branch_mix.png``: the learned branch weights of intra-layer hybrids (α, λ) against the layer;
- ``headlines.png``: every saved evaluation's headline numbers, a small bar chart per metric;
- ``loss_by_position.png`` and ``languages.png``: the curves of the runs that saved those
  evaluations, drawn together (``strata.evals.long_context``, ``strata.evals.languages``).

A plot whose data no run has is skipped with the reason, never drawn empty.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import (
    EngFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    ScalarFormatter,
)

CONTEXTS = [2**n for n in range(8, 16)]  # 256 .. 32K


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the (speed, quality) points that no other point dominates: at least as fast and
    at least as good, and strictly better in one. Higher speed is always better."""

    def better(a: float, b: float) -> bool:
        return a > b if higher_is_better else a < b

    front = []
    for i, (speed, quality) in enumerate(points):
        dominated = any(
            s >= speed and (q == quality or better(q, quality)) and (s > speed or better(q, quality))
            for j, (s, q) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _save(figure: Figure, path: Path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return str(path)


def quality_vs_flops(report, path: Path) -> str:
    if any(run.curve for run in report.runs):
        curves, label = {run.name: run.curve for run in report.runs if run.curve}, "validation bits per byte"
    elif any(run.recall_curve for run in report.runs):
        curves, label = {run.name: run.recall_curve for run in report.runs if run.recall_curve}, "MQAR recall (held-out)"
    else:
        return "no run has validation (or MQAR recall) points in metrics.jsonl"
    figure = Figure(figsize=(6.4, 4.4))
    axes = figure.subplots()
    if len(curves) > 10:  # the default cycle has 10 colours: an 11th curve would repeat the first's
        axes.set_prop_cycle(color=colormaps["tab20"].colors)
    for name, curve in curves.items():
        flops, quality = zip(*curve)
        axes.plot(flops, quality, marker="o", markersize=3, label=name)
    _log_x(axes)
    axes.set_xlabel("training FLOPs (cost model)")
    axes.set_ylabel(label)
    axes.set_title("Quality against training compute")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="x-small", ncol=2)
    return _save(figure, path)


def _log_x(axes) -> None:
    """A log x axis labelled at 1, 2 and 5 of each decade (5 k, 1 M, 2 T): sweeps often span less
    than a decade, which plain decade ticks would leave without a single label."""
    axes.set_xscale("log")
    axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(EngFormatter(sep=" "))
    axes.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log range overlap


def quality_vs_decode(report, path: Path) -> str:
    timed = [run for run in report.runs if "decode/tokens_per_s" in run.headlines]
    if not timed:
        return "no run has a decode evaluation"
    if all(run.val_bpb is not None for run in timed):
        quality, label, higher = [run.val_bpb for run in timed], "validation bits per byte (lower is better)", False
    elif all("mqar/recall" in run.headlines for run in timed):
        quality, label, higher = [run.headlines["mqar/recall"] for run in timed], "MQAR recall (higher is better)", True
    else:
        return "the runs with decode rates share no quality measure (validation bpb or MQAR recall)"
    points = [(run.headlines["decode/tokens_per_s"], q) for run, q in zip(timed, quality)]
    front = pareto_front(points, higher)
    figure = Figure(figsize=(6.4, 4.4))
    axes = figure.subplots()
    axes.scatter(*zip(*points), color="C0", zorder=2)
    for run, (speed, q) in zip(timed, points):
        axes.annotate(run.name, (speed, q), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes.plot([points[i][0] for i in front], [points[i][1] for i in front], color="C3", marker="*", markersize=12,
              linestyle="--", zorder=3, label="Pareto front")
    _log_x(axes)
    axes.set_xlabel("decode tokens/s (measured on this machine)")
    axes.set_ylabel(label)
    axes.set_title("Quality against decode throughput")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="small")
    return _save(figure, path)


def cache_vs_context(report, path: Path) -> str:
    contexts = sorted(set(CONTEXTS) | {report.context})
    figure = Figure(figsize=(6.4, 4.4))
    axes = figure.subplots()
    for run in report.runs:
        axes.plot(contexts, [run.cache_bytes(n) / 2**20 for n in contexts], marker="o", markersize=3, label=run.name)
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_formatter(ScalarFormatter())
    axes.set_yscale("log")
    axes.set_xlabel("context length (tokens; bytes for byte-level models)")
    axes.set_ylabel("cache per sequence (MiB, bf16)")
    axes.set_title("Inference cache against context (cost model)")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="x-small", ncol=2)
    return _save(figure, path)


def mqar(report, path: Path) -> str:
    from strata.evals.mqar import plot_mqar

    rows = [{**row, "family": run.name} for run in report.runs if "mqar" in run.evaluations
            for row in run.evaluations["mqar"]["result"]["rows"]]
    if not rows:
        return "no run has an MQAR evaluation"
    return str(plot_mqar(rows, path))


def needle(report, path: Path) -> str:
    tasks = [task for task in ("needle", "passkey") if any(task in run.evaluations for run in report.runs)]
    if not tasks:
        return "no run has a needle or passkey evaluation"
    figure = Figure(figsize=(5.2 * len(tasks), 4.2))
    for axes, task in zip(figure.subplots(1, len(tasks), squeeze=False)[0], tasks):
        for run in report.runs:
            if task in run.evaluations:
                result = run.evaluations[task]["result"]
                by_length = [sum(row[j] for row in result["accuracy"]) / len(result["accuracy"])
                             for j in range(len(result["lengths"]))]
                axes.plot(result["lengths"], by_length, marker="o", label=run.name)
        axes.set_xscale("log", base=2)
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.set_ylim(-0.02, 1.02)
        axes.set_xlabel("prompt length (tokens)")
        axes.set_ylabel("accuracy (mean over depths)")
        axes.set_title(f"{task} retrieval")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="x-small")
    return _save(figure, path)


def branch_mix(report, path: Path) -> str:
    kinds = [kind for kind in ("alpha", "lambda") if any(kind in run.mix for run in report.runs)]
    if not kinds:
        return "no run's checkpoint has learned branch weights (hybrid.scale alpha or lambda)"
    # A language model's layers are numbers, spaced as such; an AU-Net's name their stack too.
    numbered = all(layer.isdigit() for run in report.runs for weights in run.mix.values() for layer in weights)
    figure = Figure(figsize=(5.2 * len(kinds), 4.2))
    for axes, kind in zip(figure.subplots(1, len(kinds), squeeze=False)[0], kinds):
        for run in report.runs:
            if kind in run.mix:
                layers = [int(layer) if numbered else layer for layer in run.mix[kind]]
                axes.plot(layers, list(run.mix[kind].values()), marker="o", label=run.name)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("layer")
        axes.set_ylabel("α (weight of Mamba; attention gets 1 − α)" if kind == "alpha" else "λ (weight of the subtracted branch)")
        axes.set_title("Learned α per layer" if kind == "alpha" else "Learned λ per layer")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="x-small")
    return _save(figure, path)


def headlines(report, path: Path) -> str:
    """One bar chart per evaluation metric, a bar per run (a run without the metric has none)."""
    metrics = report.metrics
    if not metrics:
        return "no run has saved evaluations (strata eval RUN ...)"
    columns = min(3, len(metrics))
    rows = -(-len(metrics) // columns)
    figure = Figure(figsize=(4.2 * columns, 2.8 * rows))
    grid = figure.subplots(rows, columns, squeeze=False)
    names = [run.name for run in report.runs]
    for index, metric in enumerate(metrics):
        axes = grid[index // columns][index % columns]
        values = [run.headlines.get(metric, float("nan")) for run in report.runs]
        axes.bar(range(len(names)), values, color=[f"C{i % 10}" for i in range(len(names))])
        axes.set_xticks(range(len(names)), names, rotation=20, fontsize=8, ha="right")
        axes.set_title(metric.removeprefix("task-"), fontsize=9)
        axes.grid(True, axis="y", alpha=0.3)
    for index in range(len(metrics), rows * columns):
        grid[index // columns][index % columns].axis("off")
    return _save(figure, path)


def loss_by_position(report, path: Path) -> str:
    from strata.evals.long_context import plot_loss_by_position

    curves = {run.name: run.evaluations["long_context"]["result"] for run in report.runs
              if "long_context" in run.evaluations}
    if not curves:
        return "no run has a saved loss-by-position evaluation (strata eval RUN --long ...)"
    plot_loss_by_position(curves, path, {name: result["train_length"] for name, result in curves.items()})
    return str(path)


def languages(report, path: Path) -> str:
    from strata.evals.languages import plot_languages

    results = {run.name: run.evaluations["languages"]["result"] for run in report.runs if "languages" in run.evaluations}
    if not results:
        return "no run has a saved languages evaluation (strata eval RUN --languages ...)"
    plot_languages(results, path)
    return str(path)


def draw_all(report, out: Path) -> dict[str, str]:
    """Every plot into ``out``: {title: the PNG's path, or the reason it was skipped}."""
    plots = {
        "quality against training FLOPs": (quality_vs_flops, "quality_vs_flops.png"),
        "quality against decode throughput": (quality_vs_decode, "quality_vs_decode.png"),
        "cache against context length": (cache_vs_context, "cache_vs_context.png"),
        "MQAR recall": (mqar, "mqar.png"),
        "needle and passkey accuracy": (needle, "needle.png"),
        "learned branch weights per layer": (branch_mix, "branch_mix.png"),
        "evaluation headlines": (headlines, "headlines.png"),
        "loss by position": (loss_by_position, "loss_by_position.png"),
        "bits per character by language": (languages, "languages.png"),
    }
    return {title: draw(report, out / name) for title, (draw, name) in plots.items()}

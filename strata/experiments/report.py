"""``strata report SWEEP_OR_RUN_DIRS``: the runs of sweeps (or single runs) in the papers' shape.

One row per run: its grid choices, blocks, parameters, training FLOPs per token (per byte for an
AU-Net), tokens and FLOPs trained, inference cache at a context (bf16, from the cost model),
validation bits per byte (the trainer's last validation), the headline of every saved evaluation
(tasks, held-out text, needle, MQAR, ...) and decode tokens/s. Written as ``report.md`` and
``report.csv`` with the plots of ``strata.experiments.plots`` beside them, and printed as a table.
Runs whose intra-layer hybrids learn how to weigh their branches (α of the hybrid paper's
Appendix Q, Diff-T's λ) get a second table, those values per layer, read from the newest checkpoint.

Costs come from a sweep run's ``plan.json`` (what the sweep matched); for a run trained outside a
sweep they are computed from its config, measuring an AU-Net's contraction on its training data.
Tokens and FLOPs are those actually trained, read from ``metrics.jsonl``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table
from safetensors import SafetensorError, safe_open

from strata.config import AUNetConfig, Config, load_config, validate_config
from strata.cost.aunet import aunet_cost
from strata.cost.info import human
from strata.cost.info import runs as short_layout
from strata.cost.model import model_cost
from strata.evals.report import load_evaluations
from strata.experiments.budget import RunCost, run_cost
from strata.nn.hybrid import diff_lambda, lambda_init
from strata.train.checkpoint import list_checkpoints
from strata.train.metrics import read_metrics

DECODE = "decode/tokens_per_s"
TASK_MEAN = "tasks mean acc_bytes"  # the papers' few-shot average (per-byte normalised), over the task files evaluated
# A learned branch weight of a hybrid block: "blocks.4.mixer.alpha" (an AU-Net's stacks have other
# prefixes); λ is read through its first vector.
MIX_WEIGHT = re.compile(r"^(?P<stack>.+)\.(?P<index>\d+)\.mixer\.(?P<name>alpha|lambda_q1)$")
MIX_SYMBOLS = {"alpha": "α", "lambda": "λ"}


@dataclass
class RunReport:
    name: str
    run_dir: Path
    config: Config
    cost: RunCost
    choices: dict[str, str] = field(default_factory=dict)
    tokens: int | None = None  # trained so far
    val_bpb: float | None = None
    curve: list[tuple[float, float]] = field(default_factory=list)  # (training FLOPs, validation bpb)
    recall_curve: list[tuple[float, float]] = field(default_factory=list)  # MQAR runs: (FLOPs, held-out recall)
    headlines: dict[str, float] = field(default_factory=dict)  # "evaluation/metric" -> value
    evaluations: dict[str, dict] = field(default_factory=dict)
    finished: bool = False
    head: bool = False  # FLOPs count the output head, as the run's sweep matched them
    mix: dict[str, dict[str, float]] = field(default_factory=dict)  # "alpha"/"lambda" -> {layer: value}

    @property
    def flops_per_token(self) -> float:
        return self.cost.flops_per_token_with_head if self.head else self.cost.flops_per_token

    @property
    def task_mean(self) -> float | None:
        scores = [value for name, value in self.headlines.items() if name.startswith("task-") and name.endswith("/acc_bytes")]
        return sum(scores) / len(scores) if scores else None

    @property
    def flops(self) -> float | None:
        return None if self.tokens is None else self.tokens * self.flops_per_token

    def cache_bytes(self, context: int) -> int:
        model = self.config.model
        if isinstance(model, AUNetConfig):
            return aunet_cost(model, context, "bf16", self.cost.contraction).cache_bytes
        return model_cost(model, context, "bf16").cache_bytes


@dataclass
class Report:
    runs: list[RunReport]
    axes: list[str]
    sweeps: list[dict]  # the sweep.json of each sweep given
    context: int

    @property
    def metrics(self) -> list[str]:
        """Every evaluation headline some run has, in first-seen order, decode throughput last."""
        names = list(dict.fromkeys(name for run in self.runs for name in run.headlines if name != DECODE))
        return names + ([DECODE] if any(DECODE in run.headlines for run in self.runs) else [])


def collect(paths: list[str | Path], context: int) -> Report:
    """The report of sweep folders (``sweep.json``) and run folders (``config.yaml``), in order."""
    runs, axes, sweeps = [], [], []
    for path in map(Path, paths):
        if (path / "sweep.json").exists():
            sweep = json.loads((path / "sweep.json").read_text())
            sweeps.append(sweep)
            axes += [axis for axis in sweep["axes"] if axis not in axes]
            head = bool(sweep["budget"] and sweep["budget"].get("head"))
            runs += [read_run(path / run["name"], head) for run in sweep["runs"]
                     if (path / run["name"] / "config.yaml").exists()]
        elif (path / "config.yaml").exists():
            runs.append(read_run(path))
        else:
            raise ValueError(f"{path}: neither a sweep folder (sweep.json) nor a run folder (config.yaml)")
    if not runs:
        raise ValueError(f"no runs found in {', '.join(map(str, paths))}")
    return Report(runs, axes, sweeps, context)


def read_run(run_dir: Path, head: bool = False) -> RunReport:
    """One run's figures; ``head``: its FLOPs count the output head (its sweep matched them so)."""
    plan_file = run_dir / "plan.json"
    if plan_file.exists():
        plan = json.loads(plan_file.read_text())
        config = validate_config(plan["config"], str(plan_file))
        cost, choices = RunCost(**plan["cost"]), plan["choices"]
    else:
        config = load_config(run_dir / "config.yaml")
        cost, choices = run_cost(config), {}
    report = RunReport(run_dir.name, run_dir, config, cost, choices, finished=(run_dir / "done.json").exists(), head=head)
    tokens_at: dict[int, int] = {}
    for record in read_metrics(run_dir):
        if "tokens" in record:
            tokens_at[record["step"]] = record["tokens"]
            report.tokens = record["tokens"]
        if record.get("val_bpb") is not None:
            report.val_bpb = record["val_bpb"]
            tokens = tokens_at.get(record["step"], record["step"] * cost.tokens_per_step)
            report.curve.append((tokens * report.flops_per_token, record["val_bpb"]))
        if record.get("recall") is not None:
            report.recall_curve.append((record["tokens"] * report.flops_per_token, record["recall"]))
    report.evaluations = load_evaluations(run_dir)
    for name, record in report.evaluations.items():
        for metric, value in record["headline"].items():
            report.headlines[f"{name}/{metric}"] = value
    report.mix = branch_mix(run_dir)
    return report


def branch_mix(run_dir: Path) -> dict[str, dict[str, float]]:
    """The learned branch weights of the newest checkpoint, {"alpha" or "lambda": {layer: value}},
    layers 1-indexed as the papers count them (an AU-Net stack's prefixed: "encoders.0.2"). Only
    these few tensors are read, not the whole model."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return {}
    found = []
    try:
        with safe_open(str(checkpoints[0] / "model.safetensors"), "pt") as weights:
            for key in weights.keys():
                match = MIX_WEIGHT.match(key)
                if match is None:
                    continue
                layer = int(match["index"]) + 1
                if match["name"] == "alpha":
                    kind, value = "alpha", weights.get_tensor(key).item()
                else:
                    prefix = key.removesuffix("q1")
                    vectors = (weights.get_tensor(prefix + part) for part in ("q1", "k1", "q2", "k2"))
                    kind, value = "lambda", diff_lambda(*vectors, lambda_init(layer)).item()
                found.append((kind, match["stack"], layer, value))
    except (SafetensorError, OSError) as error:
        warnings.warn(f"{checkpoints[0]}: learned branch weights not read ({error})", stacklevel=2)
        return {}
    mix: dict[str, dict[str, float]] = {}
    for kind, stack, layer, value in sorted(found):  # by stack, then layer (not "10" before "2")
        mix.setdefault(kind, {})[str(layer) if stack == "blocks" else f"{stack}.{layer}"] = value
    return mix


# --- tables -----------------------------------------------------------------------------------


def blocks(layout: str) -> str:
    """A layout as it reads best in a table: whole up to 24 blocks, runs shortened beyond."""
    return layout if len(layout) <= 24 else short_layout(layout)


def _label(metric: str) -> str:
    if metric == DECODE:
        return "decode tok/s (this machine)"
    name, value = metric.split("/", 1)
    return f"{name.removeprefix('task-')} {value}"


def rows(report: Report) -> tuple[list[str], list[list]]:
    """(header, rows of raw values): what the CSV holds and the Markdown table formats."""
    tasks = any(run.task_mean is not None for run in report.runs)
    header = ["run", *report.axes, "blocks", "params", "non-embedding params", "FLOPs/token", "tokens", "train FLOPs",
              f"cache MiB @ {report.context:,}", "val bpb", *([TASK_MEAN] if tasks else []), *map(_label, report.metrics),
              "finished"]
    table = []
    for run in report.runs:
        table.append([run.name, *(run.choices.get(axis, "") for axis in report.axes), run.config.model.layout,
                      run.cost.params, run.cost.non_embedding_params, run.flops_per_token, run.tokens, run.flops,
                      run.cache_bytes(report.context) / 2**20, run.val_bpb, *([run.task_mean] if tasks else []),
                      *(run.headlines.get(m) for m in report.metrics), run.finished])
    return header, table


def _cell(header: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if header == "blocks":
        return blocks(value)
    if header in ("params", "non-embedding params", "tokens") or header.startswith("FLOPs/"):
        return human(value)
    if header == "train FLOPs":
        return f"{value:.3g}"
    if header.startswith("cache"):
        return f"{value:,.2f}"
    if header.startswith("decode"):
        return f"{value:,.0f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def mix_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """(header, formatted rows): a row per layer, a column per run and learned weight (α, λ);
    no rows when no run learns one."""
    columns = [(run, kind) for run in report.runs for kind in MIX_SYMBOLS if kind in run.mix]
    labels = {layer for run, kind in columns for layer in run.mix[kind]}
    layers = sorted(labels, key=lambda label: (label.rpartition(".")[0], int(label.rpartition(".")[2])))
    header = ["layer", *(f"{run.name} {MIX_SYMBOLS[kind]}" for run, kind in columns)]
    return header, [[layer, *(_cell("", run.mix[kind].get(layer)) for run, kind in columns)] for layer in layers]


def _markdown(header: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def markdown_table(report: Report) -> str:
    header, table = rows(report)
    return _markdown(header, [[_cell(h, v) for h, v in zip(header, row)] for row in table])


def csv_text(report: Report) -> str:
    header, table = rows(report)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if value is None else value for value in row] for row in table])
    return buffer.getvalue()


def print_report(console: Console, report: Report, out: Path) -> None:
    """The table for a terminal: the Markdown table's columns less the ones per task (their mean
    stays), the axes (the run's name spells them), the non-embedding parameters, the training
    FLOPs (the heading of report.md says what they were matched at) and the finished flag."""
    header, table = rows(report)
    hidden = {*report.axes, "non-embedding params", "train FLOPs", "finished",
              *(_label(m) for m in report.metrics if m.startswith("task-"))}
    shown = [i for i, name in enumerate(header) if name not in hidden]
    console.print(f"[bold]{len(report.runs)} runs — cache at {report.context:,} tokens, bf16[/bold]")
    grid = Table()
    for index in shown:
        grid.add_column(header[index], justify="left" if header[index] in ("run", "blocks") else "right",
                        overflow="fold", no_wrap=header[index] in ("run", "blocks"))
    for row in table:
        grid.add_row(*(_cell(header[i], row[i]) for i in shown))
    console.print(grid)
    mix_header, mix_table = mix_rows(report)
    if mix_table:
        console.print("[bold]learned branch weights per layer[/bold] (α: α·Mamba + (1 − α)·attention; λ: Diff-T's, b − λ·a)")
        mix_grid = Table()
        for name in mix_header:
            mix_grid.add_column(name, justify="left" if name == "layer" else "right")
        for row in mix_table:
            mix_grid.add_row(*row)
        console.print(mix_grid)
    unfinished = [run.name for run in report.runs if not run.finished]
    if unfinished:
        console.print(f"not finished (partial figures): {', '.join(unfinished)}")
    console.print(f"report.md, report.csv and plots written to {out}/")


# --- the whole report -------------------------------------------------------------------------


def _heading(report: Report) -> list[str]:
    lines = ["# Sweep report", ""]
    for sweep in report.sweeps:
        budget = sweep["budget"]
        kind = None if budget is None else "FLOPs" if budget["kind"] == "flops" else budget["kind"]
        matched = "no budget" if budget is None else f"{kind}-matched at {budget['value']:.3g}"
        if budget is not None and budget["kind"] == "flops":
            matched += " (output head counted)" if budget["head"] else " (output head not counted)"
        lines.append(f"- `{sweep['sweep']}`" + (f", size `{sweep['size']}`" if sweep["size"] else "")
                     + f": {sweep['description'] or 'no description'}; {matched}.")
    counted = " (+ the output head, where the sweep counted it)" if any(run.head for run in report.runs) else ""
    lines += ["", "Training FLOPs per token from the cost model (6 x non-embedding parameters + the mixers' sequence "
              f"terms{counted}; a token is a byte for byte-level models and AU-Net); tokens and FLOPs as trained; cache at "
              f"{report.context:,} tokens in bf16 from the cost model; val bpb is the trainer's last validation."]
    measured = [run.evaluations["decode"]["result"]["machine"] for run in report.runs if "decode" in run.evaluations]
    machines = {(where["processor"], where["device"], where["threads"]) for where in measured}
    for processor, device, threads in sorted(machines):
        lines.append(f"Decode tokens/s measured on this machine ({processor}, {device}, {threads} threads) right after "
                     "each run's training: compare runs within this table only, and mind the load.")
    loads = [where["load_average"] for where in measured if "load_average" in where]
    if loads:
        lines.append(f"1-minute load average during the measurements: {min(loads):.1f} to {max(loads):.1f} "
                     "(with --jobs > 1, other runs trained meanwhile).")
    return lines


def write_report(report: Report, out: Path) -> dict[str, str | None]:
    """Write report.md, report.csv and the plots into ``out``; {plot: file, or why it was skipped}."""
    from strata.experiments.plots import draw_all

    out.mkdir(parents=True, exist_ok=True)
    plots = draw_all(report, out)
    lines = [*_heading(report), "", markdown_table(report), ""]
    mix_header, mix_table = mix_rows(report)
    if mix_table:
        lines += ["## Learned branch weights per layer", "",
                  "α mixes a hybrid block as α·Mamba + (1 − α)·attention (the hybrid paper's Appendix Q); λ is "
                  "the Differential Transformer's weight of the subtracted branch (b − λ·a). From each run's newest "
                  "checkpoint; layers counted from 1.", "", _markdown(mix_header, mix_table), ""]
    lines += ["## Plots", ""]
    for title, outcome in plots.items():
        lines.append(f"![{title}]({Path(outcome).name})" if outcome.endswith(".png") else f"- {title}: skipped, {outcome}")
        lines.append("")
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.csv").write_text(csv_text(report))
    return plots

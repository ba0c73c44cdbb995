"""``strata sweep SWEEP.yaml``: expand a sweep file into runs matched by a budget and run them.

    SWEEP_OUT/                  (default sweeps/<file name>-<size>)
        sweep.json              the sweep: file, size, budget, axes, runs in order
        <run>/plan.json         resolved config with its planned steps, costs, evaluations
        <run>/config.yaml       the resolved config, written before training starts
        <run>/log.txt           the run's output (training progress, errors)
        <run>/...               what ``strata train`` and ``strata eval`` write, then done.json

Runs go one after another, or ``jobs`` at a time, each in its own process
(``strata.experiments.sweep_run``), so a crash or a kill costs at most the runs in flight, and those
continue from their last checkpoint when the sweep is started again; finished runs (``done.json``)
are skipped. Each process gets ``OMP_NUM_THREADS`` = cores / jobs unless it is set already.
A re-run whose plan changed stops with an error if a run's training config changed (its
directory holds another model), and re-evaluates finished runs, without training, if only the
evaluations changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from strata.config import ConfigError, config_to_dict, validate_config
from strata.cost.info import human
from strata.experiments.budget import PlannedRun, plan_runs
from strata.experiments.report import blocks
from strata.experiments.sweep_run import BUSY, DONE, PLAN, write_json
from strata.experiments.sweep_spec import (
    PATH_FIELDS,
    Budget,
    MQARTraining,
    Sweep,
    SweepEval,
    load_sweep,
)


def plan_sweep(path: str | Path, size: str | None, overrides: list[str] = ()
               ) -> tuple[Sweep, str | None, list[PlannedRun], SweepEval, MQARTraining | None]:
    """Read a sweep file and plan its runs at ``size``: (sweep, size, runs, evaluations, MQAR
    training or None). ConfigError names the file and the key."""
    sweep = load_sweep(path)
    size = sweep.size_name(size)
    evaluation, mqar = sweep.evaluation(size), sweep.mqar(size)
    if mqar is not None:
        asked = [name for name, value in asdict(evaluation.request).items()
                 if name in (*PATH_FIELDS, "passkey") and value]
        if asked:
            raise ConfigError(f"{sweep.path}: eval.{asked[0]}: MQAR runs have no tokenizer for text evaluations")
    runs = plan_runs(sweep.runs(size, overrides), sweep.budget(size), mqar)
    return sweep, size, runs, evaluation, mqar


def print_plan(console: Console, runs: list[PlannedRun], budget: Budget | None, size: str | None) -> None:
    """The dry run: every run with its layout, parameters, FLOPs per token, steps, tokens, FLOPs."""
    table = Table(title=f"{len(runs)} runs" + (f", size {size}" if size else ""), title_justify="left")
    columns = ["run", "layout", "params", "non-emb", "FLOPs/token", "steps", "tokens", "train FLOPs"]
    if budget is not None and budget.kind == "params":
        columns.append("chosen")
    for column in columns:
        table.add_column(column, justify="left" if column in ("run", "layout", "chosen") else "right", no_wrap=column == "run")
    head = budget is not None and budget.head
    for run in runs:
        per_token = run.cost.flops_per_token_with_head if head else run.cost.flops_per_token
        row = [run.name, blocks(run.config.model.layout), human(run.cost.params), human(run.cost.non_embedding_params),
               human(per_token), f"{run.steps:,}", human(run.tokens), f"{run.counted_flops(head):.3e}"]
        if budget is not None and budget.kind == "params":
            row.append(", ".join(f"{key}={value}" for key, value in run.matched.items()))
        table.add_row(*row)
    console.print(table)
    flops = [run.counted_flops(head) for run in runs]
    spread = max(flops) / min(flops) - 1
    counted = "with the output head" if head else "without the output head"
    if any(run.config.data.tokenizer == "bpe" for run in runs) and len({run.config.data.tokenizer for run in runs}) > 1:
        console.print("a token is a byte, except for the BPE runs")
    if budget is None:
        console.print(f"no budget: each run trains what its config says; training FLOPs differ by {spread:.1%}")
    elif budget.kind == "flops":
        console.print(f"FLOPs-matched at {budget.value:.3e} ({counted}): the runs differ by {spread:.2%} "
                      f"(tolerance {budget.tolerance:.0%})")
    else:
        console.print(f"{budget.kind}-matched at {budget.value:.4g}: training FLOPs ({counted}) differ by {spread:.1%}")


def run_sweep(path: str | Path, size: str | None, out: str | Path | None, jobs: int = 1, dry_run: bool = False,
              overrides: list[str] = (), console: Console | None = None) -> int:
    """Run (or with ``dry_run`` only print) a sweep; 0 when every run is finished."""
    console = console or Console()
    sweep, size, runs, evaluation, mqar = plan_sweep(path, size, overrides)
    if sweep.spec.description:
        console.print(f"[bold]{sweep.spec.description}[/bold]")
    if dry_run:
        print_plan(console, runs, sweep.budget(size), size)
        return 0
    out = Path(out) if out else Path("sweeps") / (sweep.path.stem + (f"-{size}" if size else ""))
    out.mkdir(parents=True, exist_ok=True)
    budget = sweep.budget(size)
    write_json(out / "sweep.json", {
        "sweep": str(sweep.path), "description": sweep.spec.description, "size": size,
        "budget": budget.model_dump() if budget else None, "axes": list(sweep.spec.grid),
        "runs": [{"name": run.name, "choices": run.choices} for run in runs],
    })
    for run in runs:
        _prepare(out / run.name, run, evaluation, mqar, sweep, size, console)
    finished = [run.name for run in runs if (out / run.name / DONE).exists()]
    if finished:
        console.print(f"skipping {len(finished)} finished: {', '.join(finished)}")
    pending = [run for run in runs if run.name not in finished]
    status = {name: "finished earlier" for name in finished}
    status.update(_execute(pending, runs, out, jobs, console))
    _summary(console, runs, out, status, budget is not None and budget.head)
    console.print(f"tables and plots: strata report {out}")
    return 0 if all(status[run.name] in ("done", "finished earlier") for run in runs) else 1


def _prepare(run_dir: Path, run: PlannedRun, evaluation: SweepEval, mqar: MQARTraining | None, sweep: Sweep,
             size: str | None, console: Console) -> None:
    """Write the run's plan and resolved config, or check that an earlier plan is the same run."""
    config = _plain(config_to_dict(run.config))
    plan = {
        "name": run.name, "sweep": str(sweep.path), "size": size, "choices": run.choices, "config": config,
        "cost": asdict(run.cost), "steps": run.steps, "tokens": run.tokens, "flops": run.flops,
        "flops_with_head": run.flops_with_head, "matched": run.matched,
        "eval": _plain(evaluation.model_dump()), "mqar": mqar.model_dump() if mqar else None,
    }
    if (run_dir / PLAN).exists():
        earlier = json.loads((run_dir / PLAN).read_text())
        trained = {"config": _current_schema(earlier["config"], run_dir), "mqar": earlier["mqar"]}
        planned = {"config": plan["config"], "mqar": plan["mqar"]}
        if trained != planned:
            raise ConfigError(f"{run_dir}: was started with another config ({_difference(trained, planned)}); "
                              "remove the folder or choose another --out")
        if earlier["eval"] == plan["eval"]:
            return
        if (run_dir / DONE).exists():
            console.print(f"{run.name}: the evaluations changed; evaluating it again (without training)")
            (run_dir / DONE).unlink()
        shutil.rmtree(run_dir / "evals", ignore_errors=True)  # the report shows the new set alone
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / PLAN, plan)
    if not (run_dir / "config.yaml").exists():
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _current_schema(config: dict, run_dir: Path) -> dict:
    """An earlier plan's config as today's schema resolves it: a key added since, with a default
    that keeps the old behaviour, is filled in, so the run still compares equal and resumes."""
    try:
        return _plain(config_to_dict(validate_config(config, str(run_dir / PLAN))))
    except ConfigError as error:
        raise ConfigError(f"{error}; the run was planned by another strata: remove the folder or choose another --out") from None


def _plain(data):
    """As JSON reads it back (tuples as lists), so an earlier plan compares equal."""
    return json.loads(json.dumps(data))


def _difference(old, new, key: str = "") -> str:
    """The first dotted key where two config trees differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                return _difference(old.get(name), new.get(name), f"{key}.{name}" if key else name)
    return f"{key}: {old!r} then, {new!r} now"


def _execute(pending: list[PlannedRun], runs: list[PlannedRun], out: Path, jobs: int, console: Console) -> dict[str, str]:
    """Run ``pending``, ``jobs`` processes at a time; the status of each."""
    order = {run.name: index for index, run in enumerate(runs, start=1)}
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    queue, active, status = list(pending), {}, {}
    try:
        while queue or active:
            while queue and len(active) < jobs:
                run = queue.pop(0)
                run_dir = out / run.name
                log = (run_dir / "log.txt").open("ab")
                process = subprocess.Popen([sys.executable, "-m", "strata.experiments.sweep_run", str(run_dir)],
                                           stdout=log, stderr=subprocess.STDOUT, env=env)
                active[run.name] = (process, time.perf_counter(), log)
                console.print(f"[{order[run.name]}/{len(runs)}] {run.name}: started, {run.steps:,} steps "
                              f"(log: {run_dir / 'log.txt'})")
            for name, (process, start, log) in list(active.items()):
                code = process.poll()
                if code is None:
                    continue
                log.close()
                del active[name]
                status[name] = _outcome(out / name, code)
                seconds = time.perf_counter() - start
                console.print(f"[{order[name]}/{len(runs)}] {name}: {status[name]} after {seconds:,.0f} s")
            time.sleep(0.2)
    except KeyboardInterrupt:
        console.print("interrupted: letting the running runs save a checkpoint; start the sweep again to continue")
        for process, _, _ in active.values():
            process.wait()
        raise SystemExit(130) from None
    return status


def _outcome(run_dir: Path, code: int) -> str:
    if code == 0 and (run_dir / DONE).exists():
        return "done"
    if code == BUSY:
        return "busy: another process is running it"
    lines = [line for line in (run_dir / "log.txt").read_text(errors="replace").splitlines() if line.strip()]
    return f"failed (exit {code}): {lines[-1].strip() if lines else 'no output'}"


def _summary(console: Console, runs: list[PlannedRun], out: Path, status: dict[str, str], head: bool) -> None:
    table = Table(title=f"sweep {out}", title_justify="left")
    for column in ("run", "status", "steps", "train FLOPs", "val bpb", "decode tok/s"):
        table.add_column(column, justify="left" if column in ("run", "status") else "right", no_wrap=column == "run")
    for run in runs:
        done = json.loads((out / run.name / DONE).read_text()) if (out / run.name / DONE).exists() else {}
        decode = out / run.name / "evals" / "decode.json"
        rate = json.loads(decode.read_text())["headline"]["tokens_per_s"] if done and decode.exists() else None
        table.add_row(run.name, status.get(run.name, "not run"), f"{run.steps:,}", f"{run.counted_flops(head):.3g}",
                      f"{done['val_bpb']:.3f}" if done.get("val_bpb") is not None else "–",
                      f"{rate:,.0f}" if rate is not None else "–")
    console.print(table)

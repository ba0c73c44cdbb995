"""MQAR: same-size attention, Mamba-2 and hybrid models trained on recall, then asked as pairs grow.

    python benchmarks/mqar.py [--families attention inter mamba2 intra] [--minutes 10] [--out DIR]
                              [--pairs 4 8 16 32] [--examples 512] [--threads 1]

Trains each family by the recipe of ``strata.evals.mqar_train`` (``RECIPE``) for at most
``--minutes`` of wall clock, then evaluates recall at the training length and at twice it (where the
model's context allows) for each pair count that fits. Prints the table and writes ``mqar.json``
(recipe, per family its parameters, steps, seconds, load averages, recall during training and the
grid), ``mqar.md`` and ``mqar.png`` into ``--out``.

One thread by default: on a 2-core machine that other jobs share, two threads stall each other
(a training step measured ~7x slower with two threads than with one at load 6).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from strata.evals.mqar import mqar_grid, mqar_markdown, plot_mqar
from strata.evals.mqar_train import (
    FAMILIES,
    LEARNING_RATES,
    RECIPE,
    mqar_model_config,
    mqar_recipe,
    train_mqar,
)


def run_family(family: str, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Train ``family`` by the recipe, print its progress; (summary, grid rows)."""
    config = mqar_model_config(family)
    loads = [os.getloadavg()[0]]

    def progress(record: dict) -> None:
        if "recall" in record:
            loads.append(os.getloadavg()[0])
            print(f"  {family:>9} step {record['step']:5d}  {record['time']:6.0f} s  loss {record['loss']:.3f}  "
                  f"recall@{max(RECIPE['n_pairs'])} pairs {100 * record['recall']:5.1f} %", flush=True)

    start = time.perf_counter()
    recipe = {**mqar_recipe(family), "steps": args.steps}
    model, history = train_mqar(config, **recipe, time_limit=60 * args.minutes, seed=args.seed, callback=progress)
    seconds = time.perf_counter() - start
    seq_len = recipe["seq_len"]
    lengths = [length for length in (seq_len, 2 * seq_len) if length <= config.context_length]
    grid = [{"family": family, **row} for row in mqar_grid(model, lengths, args.pairs, args.examples)]
    summary = {
        "layout": config.layout,
        "parameters": sum(p.numel() for p in model.parameters()),
        "lr": recipe["lr"],
        "steps": history[-1]["step"],
        "train_seconds": round(seconds, 1),
        "load_average": {"min": min(loads), "max": max(loads), "mean": round(sum(loads) / len(loads), 2)},
        "recall_during_training": [(r["step"], round(r["time"], 1), r["recall"]) for r in history if "recall" in r],
    }
    print(f"{family}: {config.layout}, {summary['parameters']:,} parameters, {summary['steps']} steps in "
          f"{seconds:.0f} s (1-minute load average {min(loads):.1f}-{max(loads):.1f})", flush=True)
    return summary, grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock limit of each training run")
    parser.add_argument("--steps", type=int, default=RECIPE["steps"], help="step limit of each training run")
    parser.add_argument("--out", type=Path, default=Path("mqar-results"))
    parser.add_argument("--pairs", type=int, nargs="+", default=[4, 8, 16, 32], help="pair counts of the grid")
    parser.add_argument("--examples", type=int, default=512, help="sequences per grid cell")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"MQAR: length {RECIPE['seq_len']}, pairs {list(RECIPE['n_pairs'])} in turn, batch {RECIPE['batch_size']}, "
          f"≤ {args.steps} steps and ≤ {args.minutes:g} min per family, {args.threads} thread(s)", flush=True)
    report = {"recipe": {**RECIPE, "learning_rates": LEARNING_RATES, "steps": args.steps, "minutes": args.minutes,
                         "threads": args.threads, "seed": args.seed}, "families": {}, "grid": []}
    for family in args.families:
        report["families"][family], grid = run_family(family, args)
        report["grid"] += grid

    table = mqar_markdown(report["grid"])
    summary = "\n".join(f"- {family} ({entry['layout']}, {entry['parameters']:,} parameters, lr {entry['lr']:g}): "
                        f"{entry['steps']} steps in {entry['train_seconds']:.0f} s, 1-minute load average "
                        f"{entry['load_average']['min']:.1f}-{entry['load_average']['max']:.1f}"
                        for family, entry in report["families"].items())
    print("\n" + table + "\n" + summary)
    (args.out / "mqar.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "mqar.md").write_text(table + "\n" + summary + "\n")
    plot_mqar(report["grid"], args.out / "mqar.png")
    print(f"wrote {args.out / 'mqar.json'}, {args.out / 'mqar.md'}, {args.out / 'mqar.png'}")


if __name__ == "__main__":
    main()

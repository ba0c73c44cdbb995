"""``strata train``: train a model, continue one (``--resume``) or fine-tune one (``--init-from``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from strata.cli.arguments import positive_int
from strata.config import ConfigError, load_config


def add_parsers(commands) -> None:
    train = commands.add_parser("train", help="train a model (or continue one with --resume)")
    train.add_argument("config", nargs="?", help="YAML config file")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-3")
    train.add_argument("--data", nargs="+", metavar="PATH", help="text/JSONL files, folders or corpus names")
    train.add_argument("--steps", type=positive_int, help="optimiser steps (train.steps)")
    train.add_argument("--out", help="run directory (default runs/<config name>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest checkpoint")
    train.add_argument("--init-from", metavar="DIR",
                       help="fine-tune: start from this run, checkpoint or Hugging Face model directory (its model "
                            "section and tokenizer replace CONFIG's; data and train settings stay CONFIG's)")
    train.add_argument("--quiet", action="store_true", help="no progress output")
    train.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from strata.train.trainer import train

    overrides = list(args.overrides)
    if args.config and "=" in args.config:  # `strata train --resume RUN key=value`: no config given
        overrides.insert(0, args.config)
        args.config = None
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.data:
        overrides.append("data.sources=" + json.dumps(args.data))
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"{run_dir}: not a run directory (no config.yaml) to resume")
        config = load_config(run_dir / "config.yaml", overrides)
    elif args.config:
        config = load_config(args.config, overrides)
        run_dir = Path(args.out or Path("runs") / Path(args.config).stem)
        if args.init_from:
            from strata.train.runs import fine_tuning_config

            config = fine_tuning_config(config, args.init_from)
    else:
        raise ConfigError("give a CONFIG to train, or --resume RUN_DIR")
    result = train(config, run_dir, resume=bool(args.resume), quiet=args.quiet)
    if result.rank != 0:  # under torchrun, rank 0 reports for the run
        return 0

    console = Console(soft_wrap=True)
    verdict = "beats" if result.val_bpb < result.gzip_bpb else "does not beat"
    console.print(f"[bold]{run_dir}[/bold]: {result.step} steps, {result.tokens:,} tokens"
                  + (f" (stopped early: {result.stopped_early})" if result.stopped_early else ""))
    console.print(f"held-out bits per byte: [bold]{result.val_bpb:.3f}[/bold]   gzip -9 on the same bytes: "
                  f"{result.gzip_bpb:.3f}   (the model {verdict} gzip)")
    console.print("sample:", style="bold")
    console.print(result.sample, markup=False, highlight=False)
    return 0

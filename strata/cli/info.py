"""``strata info``: parameters, FLOPs and cache size of a config or model directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from strata.cli.arguments import positive_int
from strata.config import AUNetConfig, load_config


def add_parsers(commands) -> None:
    info = commands.add_parser("info", help="parameters, FLOPs and cache size of a config or model directory")
    info.add_argument("config", help="YAML config file, or a run, checkpoint or Hugging Face model directory")
    info.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.d_model=512")
    info.add_argument("--context", type=positive_int, default=None, help="sequence length (default: model.context_length)")
    info.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="cache element type")
    info.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    info.add_argument("--data", metavar="FILE", help="AU-Net: measure bytes per stage position on this text (a path or a name: shakespeare)")
    info.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from strata.cost.info import aunet_info, lm_info

    if Path(args.config).is_dir():  # a run, checkpoint or Hugging Face model directory
        from strata.train.runs import pretrained_config

        config = pretrained_config(args.config)
        if args.overrides:
            from strata.config import config_to_dict

            config = load_config(args.config, args.overrides, data=config_to_dict(config))
    else:
        config = load_config(args.config, args.overrides)
    if isinstance(config.model, AUNetConfig):
        splitter = None
        if config.model.split.rule == "entropy" and args.data is not None:  # measured with its byte model
            from strata.train.entropy import entropy_splitter

            splitter = entropy_splitter(config.model, args.config if Path(args.config).is_dir() else None)
        cost, rows, details = aunet_info(config, args.context, args.dtype, args.data, splitter)
    elif args.data is not None:
        raise ValueError(f"{args.config}: --data measures an AU-Net's contraction; this model reads tokens")
    else:
        cost, rows, details = lm_info(config.model, args.context, args.dtype)
    if args.json:
        print(json.dumps(cost.to_dict()))
        return 0
    console = Console()
    if config.description:
        console.print(f"[bold]{config.description}[/bold]")
    summary = Table(show_header=False, box=None, pad_edge=False)
    summary.add_column(style="cyan")
    summary.add_column(justify="right")
    for row in rows:
        summary.add_row(*row)
    console.print(summary)
    console.print(details)
    return 0

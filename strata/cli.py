"""The ``strata`` command."""

from __future__ import annotations

import argparse
import json
import sys

from strata.config import ConfigError, load_config


def _human(number: float, unit: str = "") -> str:
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(number) >= threshold:
            return f"{number / threshold:.3g}{suffix}{unit}"
    return f"{number:.3g}{unit}"


def _mib(size: int) -> str:
    return f"{size / 2**20:,.2f} MiB"


def run_info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from strata.analysis.cost import model_cost
    from strata.layout import BLOCK_SYMBOLS

    config = load_config(args.config, args.overrides)
    cost = model_cost(config.model, args.context, args.dtype)
    if args.json:
        print(json.dumps(cost.to_dict()))
        return 0
    console = Console()
    if config.description:
        console.print(f"[bold]{config.description}[/bold]")
    summary = Table(show_header=False, box=None, pad_edge=False)
    summary.add_column(style="cyan")
    summary.add_column(justify="right")
    summary.add_row("layout", cost.layout)
    summary.add_row("parameters", f"{cost.params:,} ({_human(cost.params)})")
    summary.add_row("non-embedding parameters", f"{cost.non_embedding_params:,} ({_human(cost.non_embedding_params)})")
    summary.add_row(f"training FLOPs / token @ {cost.context:,}", _human(cost.flops_per_token))
    summary.add_row("  with the output head", _human(cost.flops_per_token_with_head))
    summary.add_row(f"cache @ {cost.context:,} tokens, {cost.dtype}", _mib(cost.cache_bytes))
    console.print(summary)

    per_block = Table(title="per block", title_justify="left")
    for column in ("#", "block", "params", "FLOPs/token", "cache"):
        per_block.add_column(column, justify="left" if column == "block" else "right")
    for block in cost.blocks:
        per_block.add_row(
            str(block.index),
            f"{block.symbol} {BLOCK_SYMBOLS[block.symbol]}",
            f"{block.params:,}",
            _human(block.flops_per_token),
            _mib(block.cache_bytes),
        )
    console.print(per_block)
    return 0


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description="Hybrid attention + Mamba-2 language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="parameters, FLOPs and cache size of a config")
    info.add_argument("config", help="YAML config file")
    info.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.d_model=512")
    info.add_argument("--context", type=positive_int, default=None, help="sequence length (default: model.context_length)")
    info.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="cache element type")
    info.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    info.set_defaults(handler=run_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow the options (strata info cfg --json key=value).
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"strata: config error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``strata`` command: one module per command (or pair of related commands), each adding its
parser and running it; ``main`` maps bad input to one-line errors and exit codes."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from strata.cli import (
    convert,
    data,
    evaluate,
    experiments,
    generate,
    info,
    serve,
    train,
)
from strata.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description="Hybrid attention + Mamba-2 language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in (info, train, evaluate, generate, serve, convert, data, experiments):
        command.add_parsers(commands)
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
    warnings.formatwarning = _one_line_warning
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"strata: config error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # DataError and other bad input
        print(f"strata: error: {error}", file=sys.stderr)
        return 2
    except MemoryError as error:  # refused before allocating, or an allocation that failed
        print(f"strata: error: {error or 'out of memory'}", file=sys.stderr)
        return 1
    except OSError as error:  # disk full, a file-size limit, no permission: name the file and the reason
        where = f"{error.filename}: " if error.filename else ""
        print(f"strata: error: {where}{error.strerror or error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        from strata.train.checkpoint import CheckpointError
        from strata.train.trainer import TrainingError

        if not isinstance(error, (CheckpointError, TrainingError)):
            raise
        print(f"strata: error: {error}", file=sys.stderr)
        return 1


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """strata's own warnings (a broken checkpoint passed over, ...) as one line; others as Python prints them."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        return f"strata: warning: {message}\n"
    return _python_warning(message, category, filename, lineno, line)


_python_warning = warnings.formatwarning

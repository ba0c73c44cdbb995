"""``strata data`` (named corpora and tasks) and ``strata tokenizer train``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from strata.cli.arguments import bounded_float, positive_int


def add_parsers(commands) -> None:
    data = commands.add_parser("data", help="named corpora, folders and tasks").add_subparsers(dest="data_command",
                                                                                               required=True)
    data.add_parser("list", help="every named data set: size, licence, source, whether it is here").set_defaults(
        handler=run_data_list)
    fetch = data.add_parser("fetch", help="download (or build) named data into the cache")
    fetch.add_argument("names", nargs="*", metavar="NAME")
    fetch.add_argument("--all", action="store_true", help="every name of strata data list")
    fetch.set_defaults(handler=run_data_fetch)

    tokenizer = commands.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="tokenizer_command", required=True)
    bpe = tokenizer.add_parser("train", help="train a byte-level BPE tokenizer on the training split")
    bpe.add_argument("--data", nargs="+", required=True, metavar="PATH")
    bpe.add_argument("--vocab-size", type=positive_int, default=4096)
    bpe.add_argument("--valid-fraction", type=bounded_float(0, 0.5, low_inclusive=False, high_inclusive=False), default=0.05,
                     help="held out as in training (data.valid_fraction; default 0.05): trains on the rest")
    bpe.add_argument("--out", required=True)
    bpe.set_defaults(handler=run_tokenizer_train)


def run_data_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from strata.data import catalog_rows

    table = Table(title="named data (strata data fetch NAME; cache: $STRATA_CACHE or ~/.cache/strata)")
    for column in ("name", "kind", "size", "licence", "source", "here", "what"):
        table.add_column(column, overflow="fold")
    for row in catalog_rows():
        table.add_row(row["name"], row["kind"], row["size"], row["licence"], row["source"], row["here"], row["description"])
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    return 0


def run_data_fetch(args: argparse.Namespace) -> int:
    from strata.data import data_path, known_names

    if bool(args.names) == args.all:
        raise SystemExit("strata data fetch: give NAME ... or --all")
    for name in known_names() if args.all else args.names:
        print(f"{name}: {data_path(name)}")
    return 0


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from strata.data import BPETokenizer, load_documents, split_documents

    train_documents, _ = split_documents(load_documents(args.data), args.valid_fraction)
    tokenizer = BPETokenizer.train(train_documents, args.vocab_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    print(f"{out / 'tokenizer.json'}: byte-level BPE, {tokenizer.vocab_size} tokens; train with it: "
          f"'data.tokenizer={{kind: hf, path: {out}}}' model.vocab_size={tokenizer.vocab_size}")
    return 0

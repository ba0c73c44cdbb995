"""``strata convert``: a run, checkpoint or model directory rewritten as a strata run or a Hugging
Face directory."""

from __future__ import annotations

import argparse
import sys

from strata.cli.arguments import DTYPES


def add_parsers(commands) -> None:
    convert = commands.add_parser("convert", help="rewrite a run or model directory as a strata run or a Hugging Face directory")
    convert.add_argument("source", metavar="SRC", help="a run, checkpoint, Hugging Face or mamba_ssm model directory")
    convert.add_argument("--to", choices=["strata", "hf"], required=True,
                         help="strata: a run directory; hf: a directory AutoModelForCausalLM loads (the family that "
                              "expresses the layout: Llama, Mamba2, Bamba, GraniteMoeHybrid, NemotronH, FalconH1, "
                              "Qwen3Next or OlmoHybrid)")
    convert.add_argument("--out", required=True, metavar="DST", help="a new directory")
    convert.add_argument("--dtype", choices=DTYPES, default=None, help="weights' dtype (default as loaded)")
    convert.set_defaults(handler=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    """``strata convert SRC --to strata|hf --out DST``: a run, checkpoint or HF directory rewritten."""
    from strata.train.runs import from_pretrained, save_as_run

    trained = from_pretrained(args.source, dtype=args.dtype)
    if args.to == "hf":
        from strata.interop.pretrained import save_hf

        out = save_hf(trained.model, trained.tokenizer, args.out)
        if trained.tokenizer is not None and trained.tokenizer.kind == "bytes":
            print("strata: note: a byte tokenizer has no tokenizer.json to export; the directory has none",
                  file=sys.stderr)
    else:
        out = save_as_run(trained, args.out)
    print(f"{args.source} ({trained.family}, layout {trained.config.model.layout}) -> {out}")
    return 0

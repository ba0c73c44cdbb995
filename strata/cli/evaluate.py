"""``strata eval``: every evaluation of a run, saved in RUN/evals/, or a comparison of runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from strata.cli.arguments import DTYPES, bounded_float, positive_int, whole_number
from strata.cli.experiments import write_and_print_report


def add_parsers(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="evaluate a run (results saved in RUN/evals/), or --compare runs",
        description="Evaluate a trained run; every evaluation is saved as JSON and Markdown (and plots) in RUN/evals/.",
    )
    evaluate.add_argument("run", metavar="RUN_OR_CKPT", nargs="?")
    evaluate.add_argument("--data", nargs="+", metavar="PATH",
                          help="held-out text: bits per byte and per character (a path or a name of strata data list)")
    evaluate.add_argument("--tasks", nargs="+", metavar="TASK",
                          help="multiple-choice tasks: JSONL files or task names (sotu-next-sentence, ...)")
    evaluate.add_argument("--shots", type=whole_number(0), default=0, help="examples before each task item (default 0)")
    evaluate.add_argument("--limit", type=positive_int, default=None, help="score only the first N items of each task")
    evaluate.add_argument("--long", nargs="+", metavar="PATH", help="long documents: loss by position, with a plot")
    evaluate.add_argument("--length", type=positive_int, default=None,
                          help="window for --long in tokens (default 4x the training length; the paper's 3x)")
    evaluate.add_argument("--windows", type=positive_int, default=32, help="windows for --long, at most (default 32)")
    evaluate.add_argument("--protocol", choices=["strata", "paper"], default="strata",
                          help="--needle and --long as strata runs them (default) or as the hybrid paper ran them: "
                               "its prompt, grid and answer rule; one window a document and 1,024-token buckets")
    evaluate.add_argument("--languages", metavar="DIR",
                          help="one text per language (a folder, or udhr): bits per byte and per character each")
    evaluate.add_argument("--language-codes", nargs="+", metavar="CODE",
                          help="only these languages of --languages (file names without .txt; default all)")
    evaluate.add_argument("--needle", nargs="+", metavar="PATH",
                          help="needle in a haystack with filler from these files (give held-out text): accuracy heat map")
    evaluate.add_argument("--passkey", action="store_true", help="passkey retrieval: accuracy heat map")
    evaluate.add_argument("--lengths", type=positive_int, nargs="+", metavar="N",
                          help="context lengths in tokens for --needle/--passkey (default 1/2 to 4x the training "
                               "length; the paper's 960, 1984, ... 16320)")
    evaluate.add_argument("--max-length", type=positive_int, metavar="N",
                          help="with --protocol paper: its needle lengths up to N tokens (default 16320)")
    evaluate.add_argument("--depths", type=bounded_float(0, 1), nargs="+", metavar="D",
                          help="needle depths, 0 (start) to 1 (end) (default 0 0.25 0.5 0.75 1; the paper's 0 0.1 ... 1)")
    evaluate.add_argument("--trials", type=positive_int, help="prompts per length and depth (default 3; the paper's 100)")
    evaluate.add_argument("--characters", nargs="+", metavar="PATH",
                          help="character tasks in the style of CUTE (spell, insert, swap, ...) on words of these texts")
    evaluate.add_argument("--character-items", type=positive_int, default=100, help="items per character task (default 100)")
    evaluate.add_argument("--character-shots", type=whole_number(0), default=3,
                          help="examples before each character question (default 3)")
    evaluate.add_argument("--compare", nargs="+", metavar="RUN",
                          help="one table (and plots) across these runs' saved evaluations: strata report of the runs")
    evaluate.add_argument("--boundaries", metavar="FILE",
                          help="AU-Net: where it splits this text: statistics per stage, an HTML page")
    evaluate.add_argument("--out", help="folder for --compare's report (default ./comparison) or --boundaries' page "
                                        "(default RUN/evals/)")
    evaluate.add_argument("--context", type=positive_int, default=8192,
                          help="with --compare: context for the cache column (default 8192)")
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument("--dtype", choices=DTYPES, default=None,
                          help="weights' dtype (default: a run's own; a Hugging Face checkpoint float32 on a CPU)")
    evaluate.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    if args.compare:
        return _compare(args)
    from strata.evals.suite import EvalRequest, run_suite
    from strata.train.runs import from_pretrained

    if args.run is None:
        raise ValueError("give RUN_OR_CKPT to evaluate, or --compare RUN RUN ...")
    request = EvalRequest(data=args.data or [], tasks=args.tasks or [], shots=args.shots, limit=args.limit,
                          long=args.long or [], length=args.length, windows=args.windows, languages=args.languages,
                          language_codes=args.language_codes, needle=args.needle or [], passkey=args.passkey, protocol=args.protocol, lengths=args.lengths,
                          max_length=args.max_length, depths=args.depths, trials=args.trials,
                          characters=args.characters or [], character_items=args.character_items,
                          character_shots=args.character_shots)
    suite = (request.data or request.tasks or request.long or request.languages or request.needle or request.passkey
             or request.characters)
    if not (suite or args.boundaries is not None):
        raise ValueError("give something to evaluate: --data PATH (bits per byte), --tasks TASK (multiple choice), "
                         "--long PATH (loss by position), --languages DIR, --needle PATH, --passkey, --characters PATH "
                         "(a PATH may be a name of strata data list) or --boundaries FILE")
    if args.boundaries is not None:
        from strata.evals.boundaries import read_boundary_text, write_boundary_page

        text = read_boundary_text(args.run, args.boundaries)  # before loading any weights
    trained = from_pretrained(args.run, dtype=args.dtype)
    if trained.tokenizer is None:
        raise ValueError(f"{args.run}: has no tokenizer.json; evaluating text needs the model's tokenizer beside it")
    report = run_suite(trained, request) if suite else {}
    if args.boundaries is not None:
        from strata.evals.report import evals_dir
        from strata.evals.suite import run_dir_of

        boundaries = write_boundary_page(trained, text, args.out or evals_dir(run_dir_of(trained)), args.boundaries)
    if args.json:
        # Held-out scores at the top level and each task under its file's name, as before.
        flat: dict = {"checkpoint": str(trained.checkpoint)}
        for name, record in report.items():
            if name == "heldout":
                flat.update(record["result"])
            else:
                flat[name.removeprefix("task-")] = record["result"]
        if args.boundaries is not None:
            flat["boundaries"] = boundaries
        print(json.dumps(flat))
        return 0
    from rich.console import Console

    from strata.evals.terminal import print_report

    if report:
        print_report(Console(), trained.checkpoint, report, args.shots)
    if args.boundaries is not None:
        from strata.evals.boundaries import print_boundaries

        print_boundaries(Console(), boundaries)
    return 0


def _compare(args: argparse.Namespace) -> int:
    """``strata eval --compare RUN ...``: the report of those runs (``strata report``'s table and plots)."""
    if args.json:
        from strata.experiments.report import collect

        report = collect(args.compare, args.context)
        print(json.dumps({run.name: {"val_bpb": run.val_bpb, **run.headlines} for run in report.runs}))
        return 0
    return write_and_print_report(args.compare, Path(args.out or "comparison"), args.context)

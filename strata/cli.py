"""The ``strata`` command."""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import warnings
from pathlib import Path

from strata.config import AUNetConfig, ConfigError, load_config


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


# --dtype choices: floating weights of a loaded model.
DTYPES = ("float32", "bfloat16", "float16")


def whole_number(low: int):
    """An argparse type: an integer of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


positive_int = whole_number(1)


def bounded_float(low: float, high: float = float("inf"), low_inclusive: bool = True, high_inclusive: bool = True):
    """An argparse type: a number in [low, high] (or (low, ... without ``low_inclusive``, ..., high)
    without ``high_inclusive``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value >= low if low_inclusive else value > low) or not (value <= high if high_inclusive else value < high):
            bounds = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {value:g}")
        return value

    return parse


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
    return _write_and_print_report(args.compare, Path(args.out or "comparison"), args.context)


def run_generate(args: argparse.Namespace) -> int:
    from strata.inference.generate import cache_bytes, generate, prompt_context
    from strata.train.memory import available_memory, gib
    from strata.train.runs import from_pretrained

    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_bytes()
        except OSError as error:
            raise ValueError(f"{args.prompt_file}: cannot read the prompt file ({error.strerror})") from None
    elif args.prompt is not None:
        prompt = os.fsencode(args.prompt)  # the exact bytes given, even when they are not UTF-8
    elif not args.interactive:
        raise ValueError("give --prompt TEXT, --prompt-file PATH or --interactive")
    else:
        prompt = None
    trained = from_pretrained(args.run, dtype=args.dtype)
    if trained.tokenizer is None:
        raise ValueError(f"{args.run}: has no tokenizer.json; strata generate needs the model's tokenizer beside it")
    # Unencodable characters (a non-UTF-8 terminal) print as replacements instead of failing.
    sys.stdout.reconfigure(errors="replace")
    settings = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "stop": [os.fsencode(stop) for stop in args.stop],
        "seed": args.seed,
        "tokenizer": trained.tokenizer,
        "compile": args.compile,
    }

    context = prompt_context(trained.config.model)
    available = available_memory(next(trained.model.parameters()).device)

    def prompt_ids(data: bytes) -> tuple[list[int], bool]:
        """The prompt's tokens and whether they were cut: refused, or cut to its last ``context``
        with --truncate left, if it is longer than the model's context (``strata.inference.generate``'s
        docstring); refused if the cache for it and ``--max-new`` tokens would not fit in memory."""
        tokenizer = trained.tokenizer
        ids = [tokenizer.bos_id, *tokenizer.encode(data).tolist()]
        truncated = context is not None and len(ids) > context
        if truncated:
            what = (f"the prompt is {len(ids):,} tokens, longer than the model's context of {context:,} "
                    f"(model.context_length)")
            if args.truncate != "left":
                raise ValueError(f"{what}; shorten it, or give --truncate left to keep its last {context:,} tokens")
            ids = ids[-context:]
            print(f"strata: note: {what}; kept its last {context:,} tokens (--truncate left)", file=sys.stderr)
        if available is not None:
            parameter = next(trained.model.parameters())
            needed = cache_bytes(trained.config.model, len(ids) + args.max_new, parameter.dtype)
            if needed > available.bytes:
                raise MemoryError(f"--max-new {args.max_new:,}: the cache for {len(ids) + args.max_new:,} tokens needs "
                                  f"{gib(needed)}, more than the {gib(available.bytes)} {available.where}; "
                                  f"ask for fewer new tokens")
        return ids, truncated

    def continue_prompt(data: bytes) -> None:
        """Print the prompt (what is kept of it), then the continuation as it is generated."""
        ids, truncated = prompt_ids(data)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def show(_index: int, new: bytes) -> None:
            sys.stdout.write(decoder.decode(new))
            sys.stdout.flush()

        show(0, trained.tokenizer.decode(ids) if truncated else data)
        generate(trained.model, ids, args.max_new, on_text=show, **settings)
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
        sys.stdout.flush()

    if prompt is not None:
        continue_prompt(prompt)
    if args.interactive:
        print(f"{trained.checkpoint}: one prompt per line; Ctrl-C stops a generation, Ctrl-D quits.", file=sys.stderr)
        while True:
            try:
                print("> ", end="", file=sys.stderr, flush=True)
                line = sys.stdin.buffer.readline()
            except KeyboardInterrupt:
                print(file=sys.stderr)
                break
            if not line:
                break
            try:
                continue_prompt(line.rstrip(b"\r\n"))
            except KeyboardInterrupt:
                print(file=sys.stderr)
            except (ValueError, MemoryError) as error:  # this prompt only: the next may do
                print(f"strata: error: {error}", file=sys.stderr)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from strata.serve import load_served, serve

    served = load_served(args.run, name=args.model_name, dtype=args.dtype, device=args.device, max_batch=args.max_batch,
                         max_queue=args.max_queue, snapshot_every=args.snapshot_every,
                         cache_memory=args.cache_memory * 2**20)
    chat = "with a chat template" if served.chat else "no chat template: /v1/completions only"
    print(f"strata: serving {served.name} ({chat}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve(served, args.host, args.port, log_level="warning" if args.quiet else "info")
    return 0


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


def run_sweep(args: argparse.Namespace) -> int:
    from strata.experiments.sweep import run_sweep as sweep

    return sweep(args.sweep, args.size, args.out, args.jobs, args.dry_run, args.overrides)


def run_report(args: argparse.Namespace) -> int:
    out = Path(args.out or (args.dirs[0] if len(args.dirs) == 1 else "report"))
    return _write_and_print_report(args.dirs, out, args.context)


def _write_and_print_report(dirs: list[str], out: Path, context: int) -> int:
    from rich.console import Console

    from strata.experiments.report import collect, print_report, write_report

    report = collect(dirs, context)
    for title, outcome in write_report(report, out).items():
        if not outcome.endswith(".png"):
            print(f"{title}: skipped, {outcome}", file=sys.stderr)
    # Piped or redirected output gets a wide table instead of rich's 80 columns, which would fold
    # every cell of a sweep's table into a column of single characters.
    print_report(Console(width=None if sys.stdout.isatty() else 200), report, out)
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description="Hybrid attention + Mamba-2 language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="parameters, FLOPs and cache size of a config or model directory")
    info.add_argument("config", help="YAML config file, or a run, checkpoint or Hugging Face model directory")
    info.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.d_model=512")
    info.add_argument("--context", type=positive_int, default=None, help="sequence length (default: model.context_length)")
    info.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="cache element type")
    info.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    info.add_argument("--data", metavar="FILE", help="AU-Net: measure bytes per stage position on this text (a path or a name: shakespeare)")
    info.set_defaults(handler=run_info)

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

    generate = commands.add_parser("generate", help="continue a prompt with a trained model, streaming the text")
    generate.add_argument("run", metavar="RUN_OR_CKPT", help="a run, checkpoint or Hugging Face model directory")
    generate.add_argument("--dtype", choices=DTYPES, default=None,
                          help="weights' dtype (default: a run's own; a Hugging Face checkpoint float32 on a CPU)")
    source = generate.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="prompt text (may be empty)")
    source.add_argument("--prompt-file", metavar="PATH", help="read the prompt's bytes from a file (any bytes)")
    generate.add_argument("--interactive", action="store_true", help="then read prompts from stdin, one per line")
    generate.add_argument("--max-new", type=positive_int, default=200,
                          help="new tokens at most (default 200); refused if their cache would not fit in memory")
    generate.add_argument("--truncate", choices=["left"], default=None,
                          help="a prompt longer than the model's context (model.context_length; none for a model "
                               "of Mamba-2 blocks only) is refused; with left, its last tokens are kept, saying so")
    generate.add_argument("--temperature", type=bounded_float(0), default=0.8, help="0 is greedy (default 0.8)")
    generate.add_argument("--top-k", type=positive_int, default=None)
    generate.add_argument("--top-p", type=bounded_float(0, 1, low_inclusive=False), default=None)
    generate.add_argument("--repetition-penalty", type=bounded_float(0, low_inclusive=False), default=1.0,
                          help="> 1 discourages repeats (default 1)")
    generate.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--compile", action="store_true",
                          help="torch.compile the decoding step: 1.6-1.8x faster on a CPU, after 20-40 s of compiling (seconds once cached)")
    generate.set_defaults(handler=run_generate)

    served = commands.add_parser("serve", help="an OpenAI-compatible server (completions, chat, streaming) with "
                                                "continuous batching and prefix caching")
    served.add_argument("run", metavar="RUN_OR_DIR", help="a run, checkpoint or Hugging Face model directory")
    served.add_argument("--host", default="127.0.0.1")
    served.add_argument("--port", type=whole_number(0), default=8000)
    served.add_argument("--model-name", default=None, help="the name clients ask for (default: the directory's name)")
    served.add_argument("--dtype", choices=DTYPES, default=None, help="weights' dtype (default as loaded)")
    served.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:1, ...")
    served.add_argument("--max-batch", type=positive_int, default=32,
                        help="continuations decoded together; more requests wait in the queue (default 32)")
    served.add_argument("--max-queue", type=positive_int, default=128,
                        help="requests that may wait for a slot; more are refused with 429 (default 128)")
    served.add_argument("--snapshot-every", type=positive_int, default=256, metavar="TOKENS",
                        help="prompts are prefilled in blocks of this many tokens, each block's end kept in the "
                             "prefix cache (default 256)")
    served.add_argument("--cache-memory", type=whole_number(0), default=1024, metavar="MIB",
                        help="memory the prefix cache may hold, least recently used first out (default 1024 MiB; "
                             "0 turns it off)")
    served.add_argument("--quiet", action="store_true", help="log warnings only, not every request")
    served.set_defaults(handler=run_serve)

    convert = commands.add_parser("convert", help="rewrite a run or model directory as a strata run or a Hugging Face directory")
    convert.add_argument("source", metavar="SRC", help="a run, checkpoint, Hugging Face or mamba_ssm model directory")
    convert.add_argument("--to", choices=["strata", "hf"], required=True,
                         help="strata: a run directory; hf: a directory AutoModelForCausalLM loads (the family that "
                              "expresses the layout: Llama, Mamba2, Bamba, GraniteMoeHybrid, NemotronH, FalconH1, "
                              "Qwen3Next or OlmoHybrid)")
    convert.add_argument("--out", required=True, metavar="DST", help="a new directory")
    convert.add_argument("--dtype", choices=DTYPES, default=None, help="weights' dtype (default as loaded)")
    convert.set_defaults(handler=run_convert)

    data = commands.add_parser("data", help="named corpora, folders and tasks").add_subparsers(dest="data_command",
                                                                                               required=True)
    data.add_parser("list", help="every named data set: size, licence, source, whether it is here").set_defaults(
        handler=run_data_list)
    fetch = data.add_parser("fetch", help="download (or build) named data into the cache")
    fetch.add_argument("names", nargs="*", metavar="NAME")
    fetch.add_argument("--all", action="store_true", help="every name of strata data list")
    fetch.set_defaults(handler=run_data_fetch)

    sweep = commands.add_parser("sweep", help="run a sweep file's grid of runs, matched by a budget, and evaluate them")
    sweep.add_argument("sweep", metavar="SWEEP.yaml")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every run, e.g. data.sources=[DIR]")
    sweep.add_argument("--size", help="one of the sweep's sizes (default: the first it lists)")
    sweep.add_argument("--out", help="sweep folder (default sweeps/<file name>-<size>)")
    sweep.add_argument("--jobs", type=positive_int, default=1, help="runs at a time, each its own process (default 1)")
    sweep.add_argument("--dry-run", action="store_true", help="print the runs with their costs and steps; train nothing")
    sweep.set_defaults(handler=run_sweep)

    report = commands.add_parser("report", help="tables (Markdown, CSV) and plots of sweeps or runs")
    report.add_argument("dirs", nargs="+", metavar="SWEEP_OR_RUN_DIR")
    report.add_argument("--context", type=positive_int, default=8192, help="context for the cache column (default 8192)")
    report.add_argument("--out", help="folder for report.md, report.csv and plots (default: the one sweep given, else ./report)")
    report.set_defaults(handler=run_report)

    tokenizer = commands.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="tokenizer_command", required=True)
    bpe = tokenizer.add_parser("train", help="train a byte-level BPE tokenizer on the training split")
    bpe.add_argument("--data", nargs="+", required=True, metavar="PATH")
    bpe.add_argument("--vocab-size", type=positive_int, default=4096)
    bpe.add_argument("--valid-fraction", type=bounded_float(0, 0.5, low_inclusive=False, high_inclusive=False), default=0.05,
                     help="held out as in training (data.valid_fraction; default 0.05): trains on the rest")
    bpe.add_argument("--out", required=True)
    bpe.set_defaults(handler=run_tokenizer_train)
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
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        return f"strata: warning: {message}\n"
    return _python_warning(message, category, filename, lineno, line)


_python_warning = warnings.formatwarning


if __name__ == "__main__":
    sys.exit(main())

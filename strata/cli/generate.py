"""``strata generate``: continue a prompt (or prompts read interactively), streaming the text."""

from __future__ import annotations

import argparse
import codecs
import os
import sys
from pathlib import Path

from strata.cli.arguments import DTYPES, bounded_float, positive_int


def add_parsers(commands) -> None:
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

"""``strata serve``: the OpenAI-compatible server (``strata.serve``)."""

from __future__ import annotations

import argparse
import sys

from strata.cli.arguments import DTYPES, positive_int, whole_number


def add_parsers(commands) -> None:
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
    served.add_argument("--prefill-tokens", type=positive_int, default=1024, metavar="TOKENS",
                        help="prompt tokens read between two decoding steps, in whole blocks: more fills the batch "
                             "sooner, less keeps running requests' tokens coming evenly (default 1024)")
    served.add_argument("--cache-memory", type=whole_number(0), default=1024, metavar="MIB",
                        help="memory the prefix cache may hold, least recently used first out (default 1024 MiB; "
                             "0 turns it off)")
    served.add_argument("--quiet", action="store_true", help="log warnings only, not every request")
    served.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from strata.serve import load_served, serve

    served = load_served(args.run, name=args.model_name, dtype=args.dtype, device=args.device, max_batch=args.max_batch,
                         max_queue=args.max_queue, snapshot_every=args.snapshot_every,
                         prefill_tokens=args.prefill_tokens,
                         cache_memory=args.cache_memory * 2**20)
    chat = "with a chat template" if served.chat else "no chat template: /v1/completions only"
    print(f"strata: serving {served.name} ({chat}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve(served, args.host, args.port, log_level="warning" if args.quiet else "info")
    return 0

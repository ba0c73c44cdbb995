"""Multiple-choice scoring: the prompt once through the caches vs one full forward per choice.

    python benchmarks/multiple_choice.py [--task PATH] [--items 1000] [--shots 0]
                                         [--family transformer] [--repeats 3]

Scores ``--items`` items of a task file (its items repeated if it has fewer) with a tiny model
both ways, timed in alternation (``timing.time_alternating``), and prints seconds per pass and the
speed-up. The shared prefix is the prompt; the more choices and the longer the prompt (shots), the
more the cached path saves. CPU runs use float32 and the default thread count.
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import torch
from timing import time_alternating

from strata import build_model, load_config
from strata.data import ByteTokenizer
from strata.evals.multiple_choice import build_prompts, load_task, score_choices

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("STRATA_DATA") or ROOT.parent / "shared" / "data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, default=DATA / "tasks" / "winowhy.jsonl")
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--family", default="transformer", help="a config in configs/tiny")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    task = load_task(args.task)
    prompts = build_prompts(task, args.shots)
    pairs = list(itertools.islice(itertools.cycle(zip(task, prompts, strict=True)), args.items))
    items, prompts = [item for item, _ in pairs], [prompt for _, prompt in pairs]
    torch.manual_seed(0)
    model = build_model(load_config(ROOT / "configs/tiny" / f"{args.family}.yaml"))
    tokenizer = ByteTokenizer()
    choices = sum(len(item.choices) for item in items)
    print(f"{args.task.stem}: {len(items)} items, {choices} choices, {args.shots} shots, tiny {args.family}, "
          f"{torch.get_num_threads()} threads")

    seconds = time_alternating(
        {
            "cached": lambda: score_choices(model, tokenizer, prompts, items),
            "full forward": lambda: score_choices(model, tokenizer, prompts, items, use_cache=False),
        },
        repeats=args.repeats,
        warmup=1,
    )
    for name, value in seconds.items():
        print(f"{name:>13}: {value:7.2f} s   {len(items) / value:8.1f} items/s")
    print(f"speed-up: {seconds['full forward'] / seconds['cached']:.2f}x")


if __name__ == "__main__":
    main()

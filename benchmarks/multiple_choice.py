"""Multiple-choice scoring: the prefix tree through the caches vs one full forward per choice.

    python benchmarks/multiple_choice.py [--tasks NAME_OR_PATH ...] [--items 1000] [--shots 0]
                                         [--family transformer] [--repeats 3] [--json results.jsonl]

Scores the first ``--items`` items of each task (all of them if it has fewer: repeated items
would cost the prefix tree nothing) with a tiny model both ways, timed in alternation
(``timing.alternate``), and prints per task seconds per pass, the speed-up (median of per-round
ratios, with their range) and the token ratio: tokens the full forwards run over tokens the
prefix tree runs (``strata.evals.prefix_tree.tokens_run``). The ratio is what the speed-up would
be if a token cost the same in either path; the tree's forks, masks and padding cost on top, and
its batches save per-forward overhead. CPU runs use float32 and the default thread count.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from results import append_json_lines
from timing import alternate, paired_ratio, timed

from strata import build_model, load_config
from strata.data import ByteTokenizer
from strata.evals.multiple_choice import build_prompts, load_task, score_choices
from strata.evals.prefix_tree import tokens_run

ROOT = Path(__file__).resolve().parents[1]
# Two and four choices per item; short prompts (one sentence) and long ones (two).
DEFAULT_TASKS = ("sotu-word-order", "sotu-next-sentence", "udhr-language")


def token_ratio(tokenizer, prompts: list[str], items) -> float:
    """Tokens of one forward per (prompt, choice) over the tokens the prefix tree runs."""
    prompt_ids = [[tokenizer.bos_id, *tokenizer.encode(prompt.encode()).tolist()] for prompt in prompts]
    choice_ids = [[tokenizer.encode((" " + choice).encode()).tolist() for choice in item.choices] for item in items]
    full = sum(len(prompt) + len(choice) for prompt, choices in zip(prompt_ids, choice_ids, strict=True)
               for choice in choices)
    return full / tokens_run(prompt_ids, choice_ids)


def bench_task(name: str, model, tokenizer, args) -> dict:
    task = load_task(name)
    prompts = build_prompts(task, args.shots)
    items, prompts = task[: args.items], prompts[: args.items]
    samples = alternate({
        "cached": timed(lambda: score_choices(model, tokenizer, prompts, items)),
        "full": timed(lambda: score_choices(model, tokenizer, prompts, items, use_cache=False)),
    }, repeats=args.repeats, warmup=1)
    speedup, low, high = paired_ratio(samples["full"], samples["cached"])
    return {"task": Path(name).stem, "items": len(items), "choices": sum(len(item.choices) for item in items),
            "shots": args.shots, "family": args.family, "cached_s": statistics.median(samples["cached"]),
            "full_s": statistics.median(samples["full"]), "speedup": speedup, "speedup_range": [low, high],
            "token_ratio": token_ratio(tokenizer, prompts, items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="task names (strata data list) or .jsonl paths")
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--family", default="transformer", help="a config in configs/tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="append one JSON line per task")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_model(load_config(ROOT / "configs/tiny" / f"{args.family}.yaml"))
    tokenizer = ByteTokenizer()
    print(f"tiny {args.family}, {args.items} items a task, {args.shots} shots, {torch.get_num_threads()} threads")
    print(f"{'task':>24} {'choices':>8} {'cached s':>9} {'full s':>8} {'speed-up':>9} {'(range)':>13} {'token ratio':>12}")
    for name in args.tasks:
        row = bench_task(name, model, tokenizer, args)
        low, high = row["speedup_range"]
        print(f"{row['task']:>24} {row['choices']:>8,} {row['cached_s']:>9.2f} {row['full_s']:>8.2f} "
              f"{row['speedup']:>8.2f}x {f'({low:.2f}-{high:.2f})':>13} {row['token_ratio']:>11.2f}x", flush=True)
        append_json_lines(args.json, [row])


if __name__ == "__main__":
    main()

"""AU-Net throughput: tiny AU-Net-2 against a byte Transformer of its trunk's width and depth.

    python benchmarks/aunet.py [--batch 8] [--seq 1024] [--context 2048] [--new 64] [--repeats 5] [--json F]

Training: one optimiser step (forward, cross-entropy, backward, AdamW) on windows of Shakespeare,
in bytes per second. The text is real so that word splits fall where they fall in training; the
levels are computed beforehand, as the data pipeline does.

Decoding: a ``--context``-byte prompt of Shakespeare is prefilled, then the next ``--new`` bytes
of the text are fed one per step through the caches, in bytes per second of those steps. The
bytes are the text's, not the model's own choices: a model with random weights would rarely emit
a space, so AU-Net's trunk would almost never run and the figure would flatter it. Both models
see identical bytes, and the trunk runs as often as it would on English.

Each round times every contender once, in alternating order; the ratio to read is the median of
the per-round ratios (this machine's speed drifts by up to 2x within seconds).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from results import append_json_lines
from timing import alternate, paired_ratio

from strata import build_model, load_config
from strata.data import ByteTokenizer, corpus_path, model_levels
from strata.inference import model_cache

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"aunet2": ROOT / "configs/tiny/aunet2.yaml", "byte transformer": ROOT / "configs/tiny/byte-transformer.yaml"}


def shakespeare() -> np.ndarray:
    text = corpus_path("shakespeare").read_bytes()
    return np.concatenate([[ByteTokenizer.bos_id], ByteTokenizer().encode(text)]).astype(np.int64)


def training_measure(model, stream: np.ndarray, batch: int, seq: int):
    """Seconds per optimiser step on ``batch`` windows of ``seq + 1`` bytes."""
    rng = np.random.default_rng(0)
    index = rng.integers(0, len(stream) - seq - 1, batch)[:, None] + np.arange(seq + 1)
    tokens = torch.from_numpy(stream[index])
    levels = model_levels(model, stream)
    inputs = {"tokens": tokens[:, :-1]}
    if levels is not None:
        inputs["levels"] = torch.from_numpy(levels[index][:, :-1].astype(np.int64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def measure() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logits = model(**inputs)
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        return time.perf_counter() - start

    return measure


def decoding_measure(model, stream: np.ndarray, context: int, new: int):
    """Seconds per byte of ``new`` cached steps after a ``context``-byte prompt."""
    prompt = torch.from_numpy(stream[None, :context])
    following = torch.from_numpy(stream[context : context + new])

    def measure() -> float:
        with torch.inference_mode():
            cache = model_cache(model, 1, context + new)
            model(prompt, cache, last_only=True)
            start = time.perf_counter()
            for token in following:
                model(token.view(1, 1), cache, last_only=True)
            return (time.perf_counter() - start) / new

    return measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024, help="training window in bytes")
    parser.add_argument("--context", type=int, default=2048, help="decoding prompt in bytes")
    parser.add_argument("--new", type=int, default=64, help="bytes decoded per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="append one JSON object with the results to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {name: build_model(load_config(path)) for name, path in CONFIGS.items()}
    stream = shakespeare()
    print(
        f"{platform.processor() or platform.machine()} float32, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"median of {args.repeats} rounds"
    )
    for model in models.values():
        model.train()
    training = alternate({n: training_measure(m, stream, args.batch, args.seq) for n, m in models.items()}, args.repeats)
    for model in models.values():
        model.eval()
    decoding = alternate({n: decoding_measure(m, stream, args.context, args.new) for n, m in models.items()}, args.repeats)

    results = {"machine": platform.machine(), "threads": torch.get_num_threads(), "batch": args.batch, "seq": args.seq,
               "context": args.context, "new": args.new, "repeats": args.repeats}
    bytes_per_step = args.batch * args.seq
    print(f"\n{'':18s}{'train bytes/s':>15s}{'decode bytes/s':>16s}   (train: batch {args.batch} x {args.seq}; decode at {args.context})")
    for name in models:
        train_rate = np.median([bytes_per_step / s for s in training[name]])
        decode_rate = np.median([1 / s for s in decoding[name]])
        results[name] = {"train_bytes_per_s": float(train_rate), "decode_bytes_per_s": float(decode_rate)}
        print(f"  {name:16s}{train_rate:15.0f}{decode_rate:16.0f}")
    base, other = CONFIGS
    for label, samples in (("training", training), ("decoding", decoding)):
        middle, low, high = paired_ratio(samples[other], samples[base])  # seconds: baseline over AU-Net
        results[f"{label}_ratio"] = middle
        print(f"{base} / {other}, {label}: {middle:.2f}x (rounds {low:.2f}-{high:.2f})")
    append_json_lines(args.json, [results])


if __name__ == "__main__":
    main()

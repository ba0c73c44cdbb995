"""Loss by position: how well a model predicts token t of a window as t grows past its training length.

A window is ``[BOS] + length`` tokens of a held-out document, starting fresh (no state or context
carried in), so position t has exactly t tokens of context. The loss at each position is summed
over windows and reported per bucket of positions in bits per byte of the tokens in the bucket (so
byte and BPE models share the axis) and in nats per token. A model that uses its context gets better
with position; one that cannot extrapolate past its training length gets worse after it.
``plot_loss_by_position`` draws the curve with the training length marked. Two protocols:

- ``"strata"`` (the default): every consecutive whole window of every document, and buckets that
  double in width (0-15, 16-31, 32-63, ...), which resolve the first positions, where loss falls
  fastest. ``strata eval --long`` reads windows out to 4x the training length.
- ``"paper"`` (the hybrid paper's run, PG19-style): no packing, one row per document, its start:
  BOS and its first ``length`` tokens; buckets of a fixed 1,024 tokens (0-1023, 1024-2047, ...).
  ``strata eval --long --protocol paper`` reads out to 3x the training length, as the paper did.

In both, a document shorter than the window gives no window: it is left out, not padded, so every
bucket averages the same documents (were short documents to fill only the first buckets, the curve
would mix position with which documents are in the bucket). ``documents`` in the result counts all
given, ``windows`` those read; if no document is long enough this raises a DataError naming the longest.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from strata.data.errors import DataError
from strata.data.levels import model_inputs

FIRST_BUCKET = 16
PAPER_BUCKET = 1024
PROTOCOLS = ("strata", "paper")
DEFAULT_REACH = {"strata": 4, "paper": 3}  # strata eval's default window, in training lengths


def loss_by_position(model, tokenizer, documents, length: int, batch_size: int = 2, device=None,
                     max_windows: int | None = None, protocol: str = "strata") -> dict:
    """Bits per byte and nats per token by position bucket over windows of ``length`` tokens (after
    BOS), by ``protocol`` (module docstring). ``max_windows`` caps the number of windows (the
    first ones) to bound the time.

    Returns ``protocol``, ``length``, ``documents``, ``windows``, overall ``bpb`` and
    ``nats_per_token``, and ``buckets``: per bucket ``start``, ``end`` (exclusive), ``bpb``,
    ``nats_per_token`` and ``tokens``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown loss-by-position protocol {protocol!r}; choose {' or '.join(PROTOCOLS)}")
    if length < 1:
        raise ValueError(f"length must be a positive number of tokens, got {length}")
    device = device or next(model.parameters()).device
    windows, longest, count = [], 0, 0
    for count, document in enumerate(documents, 1):
        tokens = tokenizer.encode(document.text).astype(np.int64)
        longest = max(longest, len(tokens))
        starts = range(0, len(tokens) - length + 1, length)
        windows += [tokens[start : start + length] for start in (starts[:1] if protocol == "paper" else starts)]
    if not windows:
        raise DataError(f"no document has {length:,} tokens for one window (the longest has {longest:,}); "
                        "give longer text or a shorter length")
    windows = windows[:max_windows]
    token_bytes = _token_byte_lengths(tokenizer)
    nats, byte_counts = np.zeros(length), np.zeros(length)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in range(0, len(windows), batch_size):
                targets = torch.from_numpy(np.stack(windows[first : first + batch_size]))
                inputs = torch.cat([torch.full((len(targets), 1), tokenizer.bos_id), targets[:, :-1]], dim=1).to(device)
                logits = model(inputs, **model_inputs(model, inputs)).float()
                picked = logits.log_softmax(-1).gather(-1, targets.to(device)[..., None]).squeeze(-1)
                nats -= picked.double().sum(0).cpu().numpy()
                byte_counts += token_bytes[targets.numpy()].sum(0)
    finally:
        model.train(was_training)
    buckets = []
    for start, end in _buckets(length, protocol):
        tokens = (end - start) * len(windows)
        buckets.append({"start": start, "end": end,
                        "bpb": float(nats[start:end].sum() / math.log(2) / max(byte_counts[start:end].sum(), 1)),
                        "nats_per_token": float(nats[start:end].sum() / tokens), "tokens": tokens})
    return {"protocol": protocol, "length": length, "documents": count, "windows": len(windows),
            "bpb": float(nats.sum() / math.log(2) / byte_counts.sum()),
            "nats_per_token": float(nats.sum() / (length * len(windows))), "buckets": buckets}


def _buckets(length: int, protocol: str = "strata") -> list[tuple[int, int]]:
    """strata's [0, 16), [16, 32), [32, 64), ... or the paper's [0, 1024), [1024, 2048), ... up to
    ``length`` (the last bucket may be shorter)."""
    if protocol == "paper":
        return [(start, min(start + PAPER_BUCKET, length)) for start in range(0, length, PAPER_BUCKET)]
    edges = [0, min(FIRST_BUCKET, length)]
    while edges[-1] < length:
        edges.append(min(2 * edges[-1], length))
    return list(itertools.pairwise(edges))


def _token_byte_lengths(tokenizer) -> np.ndarray:
    """Bytes each token id stands for (0 for specials)."""
    return np.array([len(tokenizer.decode([token])) for token in range(tokenizer.vocab_size)], dtype=np.float64)


def plot_loss_by_position(results: dict[str, dict], path, train_lengths: dict[str, int] | None = None) -> None:
    """One curve per model (``results`` maps a label to a ``loss_by_position`` result): bits per
    byte against position, the training length of each model dashed. The axis is logarithmic for
    strata's doubling buckets and linear when every result has the paper's even ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Records saved before the paper's protocol existed carry no "protocol": they are strata's.
    linear = all(result.get("protocol", "strata") == "paper" for result in results.values())
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for label, result in results.items():
        middles = [(b["start"] + b["end"]) / 2 if linear else math.sqrt(max(b["start"], 1) * b["end"])
                   for b in result["buckets"]]
        line, = axes.plot(middles, [bucket["bpb"] for bucket in result["buckets"]], marker="o", label=label)
        if train_lengths and label in train_lengths:
            axes.axvline(train_lengths[label], color=line.get_color(), linestyle="--", linewidth=1)
    if not linear:
        axes.set_xscale("log", base=2)
    axes.set_xlabel("position in the window (tokens)")
    axes.set_ylabel("bits per byte")
    axes.set_title("Loss by position (dashed: training length)")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def loss_by_position_markdown(result: dict) -> str:
    rows = [f"| {b['start']}-{b['end'] - 1} | {b['bpb']:.4f} | {b['nats_per_token']:.4f} | {b['tokens']:,} |"
            for b in result["buckets"]]
    caption = (f"{result['windows']:,} windows of {result['length']:,} tokens from {result['documents']:,} documents, "
               f"{result['protocol']} protocol.")
    header = ["| positions | bits per byte | nats per token | tokens |", "|---|---|---|---|"]
    return "\n".join([caption, "", *header, *rows])

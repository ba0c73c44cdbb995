"""Loss by position: how well a model predicts token t of a window as t grows past its training length.

Windows are ``[BOS] + length`` tokens of held-out documents, each starting fresh (no state or
context carried in), so position t has exactly t tokens of context. The loss at each position is
summed over windows and reported in buckets that double in width (0-15, 16-31, 32-63, ...), as bits
per byte of the tokens in the bucket, so byte and BPE models share the axis. A model that uses its
context gets better with position; one that cannot extrapolate past its training length gets worse
after it. ``plot_loss_by_position`` draws the curve with the training length marked.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from strata.data.errors import DataError
from strata.data.levels import model_inputs

FIRST_BUCKET = 16


def loss_by_position(model, tokenizer, documents, length: int, batch_size: int = 2, device=None,
                     max_windows: int | None = None) -> dict:
    """Bits per byte by position bucket over windows of ``length`` tokens (after BOS).

    Every document contributes its consecutive whole windows; a document shorter than one
    window contributes none, and if none is long enough this raises a DataError naming the
    longest. ``max_windows`` caps the number of windows (the first ones) to bound the time.
    """
    if length < 1:
        raise ValueError(f"length must be a positive number of tokens, got {length}")
    device = device or next(model.parameters()).device
    windows, longest = [], 0
    for document in documents:
        tokens = tokenizer.encode(document.text).astype(np.int64)
        longest = max(longest, len(tokens))
        windows += [tokens[start : start + length] for start in range(0, len(tokens) - length + 1, length)]
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
    for start, end in _buckets(length):
        bucket_bytes = byte_counts[start:end].sum()
        buckets.append({"start": start, "end": end, "bpb": float(nats[start:end].sum() / math.log(2) / max(bucket_bytes, 1)),
                        "tokens": int((end - start) * len(windows))})
    return {"length": length, "windows": len(windows), "bpb": float(nats.sum() / math.log(2) / byte_counts.sum()),
            "buckets": buckets}


def _buckets(length: int) -> list[tuple[int, int]]:
    """[0, 16), [16, 32), [32, 64), ... up to ``length`` (the last bucket may be shorter)."""
    edges = [0, min(FIRST_BUCKET, length)]
    while edges[-1] < length:
        edges.append(min(2 * edges[-1], length))
    return list(itertools.pairwise(edges))


def _token_byte_lengths(tokenizer) -> np.ndarray:
    """Bytes each token id stands for (0 for specials)."""
    return np.array([len(tokenizer.decode([token])) for token in range(tokenizer.vocab_size)], dtype=np.float64)


def plot_loss_by_position(results: dict[str, dict], path, train_lengths: dict[str, int] | None = None) -> None:
    """One curve per model (``results`` maps a label to a ``loss_by_position`` result): bits per
    byte against position (log scale), the training length of each model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    for label, result in results.items():
        middles = [math.sqrt(max(bucket["start"], 1) * bucket["end"]) for bucket in result["buckets"]]
        line, = axes.plot(middles, [bucket["bpb"] for bucket in result["buckets"]], marker="o", label=label)
        if train_lengths and label in train_lengths:
            axes.axvline(train_lengths[label], color=line.get_color(), linestyle="--", linewidth=1)
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
    rows = [f"| {b['start']}-{b['end'] - 1} | {b['bpb']:.4f} | {b['tokens']:,} |" for b in result["buckets"]]
    return "\n".join(["| positions | bits per byte | tokens |", "|---|---|---|", *rows])

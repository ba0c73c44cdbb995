"""Bits per byte: held-out cross-entropy normalised by UTF-8 bytes, not tokens.

Per-token loss depends on the tokenizer (a BPE token carries several bytes), so models with
different tokenizers are compared on the total information they assign to the same bytes:
``sum over tokens of -log2 p(token) / number of bytes``. Byte and BPE models scored on the same
documents are then directly comparable, and comparable to a compressor's bits per byte.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from strata.data.errors import DataError


def bits_per_byte(model, tokenizer, documents, seq_len: int, batch_size: int = 8, device=None) -> dict:
    """Score every text token of every document once; return bits per byte overall and per document.

    Each document is ``[BOS] + encode(text)``, scored in consecutive non-overlapping windows of
    ``seq_len`` targets. A window's first input is the previous window's last token, and no context
    is carried beyond that (no state, no overlap), so a token early in a window sees less context
    than it would in a sliding-window evaluation, and scores come out somewhat worse than one.
    BOS is never a target and no EOS is added: the targets are exactly the document's text tokens,
    whose bytes are the document's bytes.

    ``model(tokens [B, T]) -> logits [B, T, V]``. Runs under ``torch.no_grad`` with ``model.eval()``
    and restores the model's training mode afterwards.
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    windows, per_document = [], []  # windows: (index into per_document, token ids)
    for document in documents:
        if not document.text:
            continue
        tokens = np.concatenate([[tokenizer.bos_id], tokenizer.encode(document.text)]).astype(np.int64)
        starts = range(0, len(tokens) - 1, seq_len)
        windows += [(len(per_document), tokens[start : start + seq_len + 1]) for start in starts]
        per_document.append({"name": document.name, "bytes": len(document.text), "nats": 0.0,
                             "tokens": len(tokens) - 1})
    if not windows:
        raise DataError("nothing to evaluate: every document is empty")
    nats = _score(model, [window for _, window in windows], tokenizer.pad_id, batch_size, device)
    for (slot, _), window_nats in zip(windows, nats):
        per_document[slot]["nats"] += window_nats
    total_nats = sum(item["nats"] for item in per_document)
    total_bytes = sum(item["bytes"] for item in per_document)
    return {
        "bpb": total_nats / math.log(2) / total_bytes,
        "nats": total_nats,
        "bytes": total_bytes,
        "tokens": sum(item["tokens"] for item in per_document),
        "per_document": [
            {"name": item["name"], "bpb": item["nats"] / math.log(2) / item["bytes"], "bytes": item["bytes"]}
            for item in per_document
        ],
    }


def _score(model, windows, pad_id: int, batch_size: int, device) -> list[float]:
    """Summed -log p(target) of each window (inputs = window[:-1], targets = window[1:])."""
    was_training = model.training
    model.eval()
    nats = []
    try:
        with torch.no_grad():
            for first in range(0, len(windows), batch_size):
                chunk = windows[first : first + batch_size]
                width = max(len(window) for window in chunk)
                batch = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                for row, window in enumerate(chunk):
                    batch[row, : len(window)] = torch.from_numpy(window)
                batch = batch.to(device)
                # Right padding: a causal model's outputs at real positions never see the pads.
                inputs, targets = batch[:, :-1], batch[:, 1:]
                lengths = torch.tensor([len(window) - 1 for window in chunk], device=device)
                real = torch.arange(width - 1, device=device)[None, :] < lengths[:, None]
                log_probs = model(inputs).float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
                nats.extend((-torch.where(real, log_probs, 0.0)).double().sum(-1).tolist())
    finally:
        model.train(was_training)
    return nats

"""Bits per byte (and per character): held-out cross-entropy normalised by UTF-8 bytes, not tokens.

Per-token loss depends on the tokenizer (a BPE token carries several bytes), so models with
different tokenizers are compared on the total information they assign to the same bytes:
``sum over tokens of -log2 p(token) / number of bytes``. Byte and BPE models scored on the same
documents are then directly comparable, and comparable to a compressor's bits per byte. Bits per
character divide the same total by the characters instead, which compares languages whose
scripts take 1 to 4 bytes a character.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from strata.data.errors import DataError
from strata.data.levels import model_levels


def bits_per_byte(model, tokenizer, documents, seq_len: int, batch_size: int = 8, device=None) -> dict:
    """Score every text token of every document once; return bits per byte overall and per document.

    Each document is ``[BOS] + encode(text)``, scored in consecutive non-overlapping windows of
    ``seq_len`` targets. A window's first input is the previous window's last token, and no context
    is carried beyond that (no state, no overlap), so a token early in a window sees less context
    than it would in a sliding-window evaluation, and scores come out somewhat worse than one.
    BOS is never a target and no EOS is added: the targets are exactly the document's text tokens,
    whose bytes are the document's bytes.

    ``model(tokens [B, T]) -> logits [B, T, V]``; a model that pools by split levels (AU-Net) also
    gets ``levels=``, computed over each whole document, as in training. Runs under
    ``torch.no_grad`` with ``model.eval()`` and restores the model's training mode afterwards.
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    windows, per_document = [], []  # windows: (index into per_document, token ids, levels or None)
    for document in documents:
        if not document.text:
            continue
        tokens = np.concatenate([[tokenizer.bos_id], tokenizer.encode(document.text)]).astype(np.int64)
        levels = model_levels(model, tokens)
        for start in range(0, len(tokens) - 1, seq_len):
            window = slice(start, start + seq_len + 1)
            windows.append((len(per_document), tokens[window], None if levels is None else levels[window]))
        per_document.append({"name": document.name, "bytes": len(document.text), "chars": count_chars(document.text),
                             "nats": 0.0, "tokens": len(tokens) - 1})
    if not windows:
        raise DataError("nothing to evaluate: every document is empty")
    nats = _score(model, [window[1:] for window in windows], tokenizer.pad_id, batch_size, device)
    for (slot, _, _), window_nats in zip(windows, nats):
        per_document[slot]["nats"] += window_nats
    total_nats = sum(item["nats"] for item in per_document)
    total_bytes = sum(item["bytes"] for item in per_document)
    total_chars = sum(item["chars"] for item in per_document)
    return {
        "bpb": total_nats / math.log(2) / total_bytes,
        "bpc": total_nats / math.log(2) / total_chars,
        "nats": total_nats,
        "bytes": total_bytes,
        "chars": total_chars,
        "tokens": sum(item["tokens"] for item in per_document),
        "per_document": [
            {"name": item["name"], "bpb": item["nats"] / math.log(2) / item["bytes"],
             "bpc": item["nats"] / math.log(2) / item["chars"], "bytes": item["bytes"], "chars": item["chars"],
             "nats": item["nats"]}
            for item in per_document
        ],
    }


def count_chars(data: bytes) -> int:
    """Characters of UTF-8 text: every byte that does not continue a character (so an undecodable
    byte counts as one character, as a decoder with replacement shows it). Never zero for non-empty
    data, so bits per character are always defined."""
    array = np.frombuffer(data, dtype=np.uint8)
    return max(1, int(np.count_nonzero((array & 0xC0) != 0x80))) if len(array) else 0


def _score(model, windows, pad_id: int, batch_size: int, device) -> list[float]:
    """Summed -log p(target) of each (tokens, levels or None) window (inputs = tokens[:-1],
    targets = tokens[1:])."""
    was_training = model.training
    model.eval()
    nats = []
    try:
        with torch.no_grad():
            for first in range(0, len(windows), batch_size):
                chunk = windows[first : first + batch_size]
                width = max(len(tokens) for tokens, _ in chunk)
                batch = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                levels = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, (tokens, window_levels) in enumerate(chunk):
                    batch[row, : len(tokens)] = torch.from_numpy(tokens)
                    if window_levels is not None:
                        levels[row, : len(tokens)] = torch.from_numpy(window_levels.astype(np.int64))
                batch = batch.to(device)
                # Right padding: a causal model's outputs at real positions never see the pads.
                inputs, targets = batch[:, :-1], batch[:, 1:]
                extra = {"levels": levels[:, :-1].to(device)} if chunk[0][1] is not None else {}
                lengths = torch.tensor([len(tokens) - 1 for tokens, _ in chunk], device=device)
                real = torch.arange(width - 1, device=device)[None, :] < lengths[:, None]
                log_probs = model(inputs, **extra).float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
                nats.extend((-torch.where(real, log_probs, 0.0)).double().sum(-1).tolist())
    finally:
        model.train(was_training)
    return nats

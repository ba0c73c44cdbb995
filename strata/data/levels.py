"""Split levels of token ids for AU-Net: the split rule run on the bytes between special tokens.

AU-Net reads byte ids (0..255) with the specials of ``ByteTokenizer``. A BOS gets the top level (a
split at every stage: the model's first position of every document opens a segment everywhere),
and the bytes after it get the levels the split rule gives the document's bytes from its start;
any other special (EOS, PAD) gets level 0 and, like BOS, starts the rule afresh after it. The same
levels come out whether the ids arrive as a packed training stream (``stream_levels``), as one
batch row (``model_inputs``) or a few at a time during generation (``TokenLevels``).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from strata.config import AUNetConfig, ModelConfig
from strata.data.splitter import LevelStream, Splitter, make_splitter
from strata.data.tokenizer import ByteTokenizer

BYTE_IDS = 256


def splitter_for(config: AUNetConfig) -> Splitter:
    """The split rule of an AU-Net config. The entropy rule's needs its byte model, which the
    model holds: use the model's ``splitter`` (``model_levels(model, ...)``)."""
    if config.split.rule == "entropy":
        raise ValueError("the entropy rule's splitter scores bytes with its byte model: use the AU-Net's "
                         "splitter (model.splitter, model_levels(model, tokens))")
    return make_splitter(**config.splitter_settings())


def model_splitter(model) -> Splitter | None:
    """The splitter of ``model`` (an AU-Net, whose ``splitter`` may hold its entropy model) or of
    an AU-Net config (a rule that needs no model); None for a model that reads tokens."""
    splitter = getattr(model, "splitter", None)
    if splitter is not None:
        return splitter
    config = getattr(model, "config", model)
    return splitter_for(config) if isinstance(config, AUNetConfig) else None


def stream_levels(tokens: np.ndarray, splitter: Splitter) -> np.ndarray:
    """The int8 level of every id of ``tokens`` (a packed stream, a document, a window)."""
    tokens = np.asarray(tokens)
    levels = np.zeros(len(tokens), dtype=np.int8)
    special = np.flatnonzero(tokens >= BYTE_IDS)
    levels[special[tokens[special] == ByteTokenizer.bos_id]] = splitter.stages - 1
    spans = [(start, end) for start, end in zip(np.concatenate([[0], special + 1]), np.concatenate([special, [len(tokens)]]))
             if end > start]
    documents = [tokens[start:end].astype(np.uint8).tobytes() for start, end in spans]
    for (start, end), document_levels in zip(spans, splitter.document_levels(documents), strict=True):
        levels[start:end] = document_levels
    return levels


def model_levels(model: torch.nn.Module | ModelConfig | AUNetConfig, tokens: np.ndarray) -> np.ndarray | None:
    """The levels of a stream of ids for a model that pools by them (AU-Net), else None. Give the
    model itself (its ``splitter``); its config does for the rules that need no model."""
    splitter = model_splitter(model)
    return stream_levels(tokens, splitter) if splitter is not None else None


def model_inputs(model: torch.nn.Module, tokens: torch.Tensor) -> dict:
    """What ``model(tokens, **model_inputs(model, tokens))`` needs beyond the ids: for an AU-Net
    the levels of each row (read as the start of a stream), for other models nothing."""
    splitter = model_splitter(model) if isinstance(getattr(model, "config", None), AUNetConfig) else None
    if splitter is None:
        return {}
    rows = [stream_levels(row, splitter) for row in tokens.cpu().numpy()]
    levels = np.stack(rows) if rows else np.zeros(tuple(tokens.shape), np.int8)
    return {"levels": torch.from_numpy(levels).to(tokens.device)}


class TokenLevels:
    """``stream_levels`` of ids that arrive a few at a time (generation), at constant work per id."""

    def __init__(self, splitter: Splitter):
        self.splitter = splitter
        self.stream: LevelStream = splitter.stream()
        # The bytes fed since the stream last started: feeding them to a new one restores its state.
        self.since_start: list[int] = []

    def feed(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        levels = np.zeros(len(ids), dtype=np.int8)
        start = 0
        for special in [*np.flatnonzero(ids >= BYTE_IDS), len(ids)]:
            if special > start:
                levels[start:special] = self.stream.feed(ids[start:special].astype(np.uint8).tobytes())
                self.since_start.extend(ids[start:special].tolist())
            if special < len(ids):
                levels[special] = self.splitter.stages - 1 if ids[special] == ByteTokenizer.bos_id else 0
                self.stream, self.since_start = self.splitter.stream(), []
            start = special + 1
        return levels

    def __deepcopy__(self, memo) -> TokenLevels:
        """A copy that goes on on its own; the splitter (an entropy rule's holds a model) is shared."""
        copied = TokenLevels.__new__(TokenLevels)
        copied.splitter, copied.since_start = self.splitter, list(self.since_start)
        copied.stream = copy.deepcopy(self.stream, memo)
        return copied

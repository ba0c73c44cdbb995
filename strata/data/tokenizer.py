"""Tokenizers: raw bytes (259 ids) or a byte-level BPE trained on the run's training text.

Both map any bytes to ids and back exactly, and both work on bytes rather than str, so bits per
byte are counted on the same bytes whichever tokenizer a model uses. A tokenizer is saved as
``tokenizer.json`` in the run directory; for BPE that is the Hugging Face ``tokenizers`` file, so
the run can be loaded by other tools.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from strata.data.errors import DataError

FILE_NAME = "tokenizer.json"
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")
# Texts are cut into pieces of about this many characters (at newlines) before BPE: the Rust
# tokenizer is slower per byte on one multi-megabyte string, and pieces encode in parallel.
PIECE_CHARS = 1 << 14
# Bytes that are not UTF-8 decode (with surrogateescape) to these lone surrogates, U+DC80..U+DCFF.
UNDECODABLE = re.compile("([\udc80-\udcff]+)")


class Tokenizer(ABC):
    """What the trainer, evaluation and sampling rely on; specials are never produced by ``encode``."""

    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    @abstractmethod
    def encode(self, data: bytes) -> np.ndarray:
        """int32 ids of ``data``, without BOS/EOS."""

    @abstractmethod
    def decode(self, ids) -> bytes:
        """The bytes of ``ids`` with special ids dropped (possibly cut mid-character)."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write ``directory/tokenizer.json``."""

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids.tolist() if hasattr(ids, "tolist") else list(ids), dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise ValueError(f"token id {bad} is outside this {self.kind} tokenizer's vocabulary of {self.vocab_size}")
        return ids


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the bytes themselves; 256, 257, 258 are BOS, EOS, PAD."""

    kind = "bytes"
    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(bytes(data), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> bytes:
        ids = self._check_ids(ids)
        return ids[ids < 256].astype(np.uint8).tobytes()

    def save(self, directory: Path) -> None:
        (Path(directory) / FILE_NAME).write_text(json.dumps({"kind": self.kind}) + "\n")


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style pre-tokenisation, no normaliser) with <bos> <eos> <pad>."""

    kind = "bpe"

    def __init__(self, tokenizer):
        """Wrap a ``tokenizers.Tokenizer``; use ``train`` or ``load_tokenizer`` to make one."""
        ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
        if None in ids:
            raise DataError(f"BPE tokenizer lacks the special token {SPECIAL_TOKENS[ids.index(None)]}")
        # Text that happens to spell "<bos>" must stay text, or decode(encode(b)) would lose it.
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        self.bos_id, self.eos_id, self.pad_id = ids
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._bytes = _token_bytes(tokenizer, self.vocab_size, set(ids))
        self._byte_ids = _byte_ids(tokenizer)

    @classmethod
    def train(cls, documents, vocab_size: int) -> BPETokenizer:
        """Learn merges from ``documents`` (the training split only, so validation stays unseen)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tokenizer = HFTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        texts = (piece for document in documents for piece in _pieces(document.text.decode("utf-8", "ignore")))
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    def encode(self, data: bytes) -> np.ndarray:
        """Text through the BPE; bytes that are not UTF-8 (say, a character cut in half by
        truncation) as their single-byte tokens, so every byte string round-trips."""
        parts = UNDECODABLE.split(bytes(data).decode("utf-8", "surrogateescape"))  # text, bad bytes, text, ...
        pieces = [_pieces(text) for text in parts[0::2]]
        encodings = iter(self._tokenizer.encode_batch([p for group in pieces for p in group], add_special_tokens=False))
        ids = [np.zeros(0, np.int32)]
        for index, part in enumerate(parts):
            if index % 2:
                ids.append(self._byte_ids[[ord(char) - 0xDC00 for char in part]])
            else:
                ids.extend(np.asarray(next(encodings).ids, dtype=np.int32) for _ in pieces[index // 2])
        return np.concatenate(ids)

    def decode(self, ids) -> bytes:
        return b"".join(self._bytes[i] for i in self._check_ids(ids).tolist())

    def save(self, directory: Path) -> None:
        self._tokenizer.save(str(Path(directory) / FILE_NAME))


def _pieces(text: str) -> list[str]:
    """``text`` cut after newlines into pieces of at least PIECE_CHARS characters (deterministic)."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + PIECE_CHARS)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _byte_ids(tokenizer) -> np.ndarray:
    """The id of each single-byte token (all 256 are in every byte-level BPE vocabulary)."""
    ids = np.zeros(256, dtype=np.int32)
    for char, byte in _byte_alphabet().items():
        index = tokenizer.token_to_id(char)
        if index is None:
            raise DataError(f"BPE vocabulary lacks the token for byte {byte}; not a byte-level tokenizer")
        ids[byte] = index
    return ids


def _token_bytes(tokenizer, vocab_size: int, special_ids: set[int]) -> list[bytes]:
    """The bytes each id stands for (b"" for specials), so decode never goes through str."""
    alphabet = _byte_alphabet()
    table = []
    for index in range(vocab_size):
        token = tokenizer.id_to_token(index)
        if index in special_ids or token is None:
            table.append(b"")
        elif all(char in alphabet for char in token):
            table.append(bytes(alphabet[char] for char in token))
        else:
            raise DataError(f"BPE token {index} ({token!r}) is not byte-level; not a strata tokenizer file")
    return table


def build_tokenizer(config, train_documents) -> Tokenizer:
    """The tokenizer ``config`` (a DataConfig) asks for, trained on ``train_documents`` if BPE."""
    if config.tokenizer == "bytes":
        return ByteTokenizer()
    return BPETokenizer.train(train_documents, config.bpe_vocab_size)


def load_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer saved in ``directory`` (a run directory)."""
    path = Path(directory) / FILE_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no tokenizer file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a readable tokenizer file ({error})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a tokenizer file (top level is not an object)")
    if data.get("kind") == "bytes":
        return ByteTokenizer()
    if (data.get("model") or {}).get("type") != "BPE":
        raise DataError(f"{path}: not a tokenizer file (neither kind 'bytes' nor a BPE model)")
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tokenizer = HFTokenizer.from_str(json.dumps(data))
    except Exception as error:  # the Rust side raises a bare Exception for malformed files
        reason = str(error).partition("\n")[0]
        raise DataError(f"{path}: broken BPE tokenizer file ({reason})") from None
    try:
        return BPETokenizer(tokenizer)
    except DataError as error:
        raise DataError(f"{path}: {error}") from None

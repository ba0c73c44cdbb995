"""Tokenizers: raw bytes (259 ids), a byte-level BPE trained on the run's training text, or any
Hugging Face ``tokenizers`` file (``data.tokenizer: {kind: hf, path: FILE_OR_DIR}``, a Llama-3
tokenizer.json say, 128,256 ids).

All take bytes and give bytes back, so bits per byte count the same bytes (the documents' own,
strata/inference/bpb.py) whatever the tokenizer; an hf tokenizer that would not give the training text
back (a normaliser, unknown tokens) is refused for that reason. The run directory keeps the
tokenizer as ``tokenizer.json``, for BPE and hf in the Hugging Face format (an hf file copied
verbatim, beside a ``tokenizer_config.json`` naming its BOS/EOS/PAD): the run is self-contained.

Which tokens of an hf tokenizer are BOS, EOS and PAD: those that tokenizer_config.json (or
special_tokens_map.json) beside the file names; else the first of the usual names below found in
its vocabulary. BOS is required (every document starts with it); EOS falls back to BOS (a model
trained here ends a document by starting the next) and PAD to EOS (padding is never scored).
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from strata.config import ConfigError
from strata.data.chat_files import ChatFiles, read_chat_files, write_chat_files
from strata.data.errors import DataError

FILE_NAME = "tokenizer.json"
CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")
# Usual names (Llama 3, SentencePiece, strata's BPE, GPT-2/Qwen, Llama 3.1's pad), tried in order.
USUAL_NAMES = {
    "bos": ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|endoftext|>"),
    "eos": ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>"),
    "pad": ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>"),
}
# A BPE's training text is cut into pieces of about this many characters (at newlines): the Rust
# tokenizer is slower per byte on one multi-megabyte string, and pieces encode in parallel. Not
# for hf files: a cut can change their ids (Llama 3 merges "\n\n"), and they must be the library's.
PIECE_CHARS = 1 << 14
# Bytes that are not UTF-8 decode (with surrogateescape) to these lone surrogates, U+DC80..U+DCFF.
UNDECODABLE = re.compile("([\udc80-\udcff]+)")
# How much training text the lossless check of an hf tokenizer reads.
CHECK_BYTES = 1 << 16


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
        (Path(directory) / CONFIG_NAME).unlink(missing_ok=True)  # one an earlier hf run left would say "hf"


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` with its BOS, EOS and PAD (use ``load_hf_tokenizer``).

    ``encode`` gives the library's own ids for UTF-8 text: one call on the whole text, no special
    tokens added, and text that spells a special token stays text (``encode_special_tokens``).
    Bytes that are not UTF-8 become byte tokens where the vocabulary has them (byte-level BPE's
    256, SentencePiece's <0xNN>), else U+FFFD. ``decode`` of a byte-level tokenizer (Llama 3,
    GPT-2, strata's BPE) maps each id to its exact bytes, so it may cut a character as the byte
    tokenizer does; for any other it is the library's decode, in UTF-8.
    """

    kind = "hf"

    def __init__(self, tokenizer, specials: tuple[str, str, str], source: bytes | None = None,
                 chat: ChatFiles | None = None):
        """``specials``: the BOS, EOS and PAD tokens; ``source``: the file's bytes, saved verbatim;
        ``chat``: the chat template that came with it (``strata.data.chat_files``), saved with it."""
        ids = [tokenizer.token_to_id(token) for token in specials]
        if None in ids:
            raise DataError(f"the tokenizer lacks the special token {specials[ids.index(None)]}")
        # Text that happens to spell "<bos>" must stay text, or decode(encode(b)) would lose it.
        tokenizer.encode_special_tokens = True
        self._tokenizer, self._source, self.specials, self.chat = tokenizer, source, tuple(specials), chat
        self.bos_id, self.eos_id, self.pad_id = ids
        self.vocab_size = _vocab_size(tokenizer)
        self._bytes = _token_bytes(tokenizer, self.vocab_size, set(ids))  # None unless byte-level
        self._byte_ids = _byte_ids(tokenizer, byte_level=self._bytes is not None)

    def _split(self, text: str) -> list[str]:
        return [text] if text else []

    def encode(self, data: bytes) -> np.ndarray:
        data = bytes(data)
        parts = UNDECODABLE.split(data.decode("utf-8", "surrogateescape"))  # text, bad bytes, text, ...
        if len(parts) > 1 and self._byte_ids is None:
            parts = [data.decode("utf-8", "replace")]  # no byte tokens to keep the bad bytes as they are
        pieces = [self._split(text) for text in parts[0::2]]
        encodings = iter(self._tokenizer.encode_batch([p for group in pieces for p in group], add_special_tokens=False))
        ids = [np.zeros(0, np.int32)]
        for index, part in enumerate(parts):
            if index % 2:
                ids.append(self._byte_ids[[ord(char) - 0xDC00 for char in part]])
            else:
                ids.extend(np.asarray(next(encodings).ids, dtype=np.int32) for _ in pieces[index // 2])
        return np.concatenate(ids)

    def encode_with_specials(self, text: str) -> np.ndarray:
        """Ids of ``text`` in which the spelling of a special token is that token (the markup a chat
        template writes, ``<|im_start|>``); the text between as ``encode`` gives it."""
        specials = sorted((token.content for token in self._tokenizer.get_added_tokens_decoder().values() if token.special),
                          key=len, reverse=True)
        if not specials:
            return self.encode(text.encode())
        ids = [np.zeros(0, np.int32)]
        for index, part in enumerate(re.split("(" + "|".join(map(re.escape, specials)) + ")", text)):
            if index % 2:
                ids.append(np.array([self._tokenizer.token_to_id(part)], np.int32))
            elif part:
                ids.append(self.encode(part.encode()))
        return np.concatenate(ids)

    def decode(self, ids) -> bytes:
        ids = self._check_ids(ids).tolist()
        if self._bytes is not None:
            return b"".join(self._bytes[i] for i in ids)
        specials = {self.bos_id, self.eos_id, self.pad_id}
        return self._tokenizer.decode([i for i in ids if i not in specials], skip_special_tokens=True).encode("utf-8")

    def save(self, directory: Path) -> None:
        """The file as it was read, a tokenizer_config.json naming BOS, EOS and PAD (which both
        ``load_tokenizer`` and transformers' AutoTokenizer read), and the chat template if any."""
        directory = Path(directory)
        if self._source is not None:
            (directory / FILE_NAME).write_bytes(self._source)
        else:
            self._tokenizer.save(str(directory / FILE_NAME))
        names = dict(zip(("bos_token", "eos_token", "pad_token"), self.specials))
        config = {**names, "tokenizer_class": "PreTrainedTokenizerFast"}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if self.chat is not None:
            write_chat_files(directory, self.chat)


class BPETokenizer(HFTokenizer):
    """Byte-level BPE (GPT-2 style pre-tokenisation, no normaliser) with <bos> <eos> <pad>, trained
    by strata; it encodes its text in pieces, which the ids of a trained run depend on."""

    kind = "bpe"

    def __init__(self, tokenizer):
        """Wrap a ``tokenizers.Tokenizer``; use ``train`` or ``load_tokenizer`` to make one."""
        missing = [token for token in SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
        if missing:
            raise DataError(f"BPE tokenizer lacks the special token {missing[0]}")
        super().__init__(tokenizer, SPECIAL_TOKENS)
        if self._bytes is None or self._byte_ids is None:
            raise DataError("BPE vocabulary is not byte-level (all 256 bytes); not a strata tokenizer file")

    @classmethod
    def train(cls, documents, vocab_size: int) -> BPETokenizer:
        """Learn merges from ``documents`` (the training split only, so validation stays unseen)."""
        from tokenizers import Tokenizer as LibraryTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tokenizer = LibraryTokenizer(models.BPE())
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

    def _split(self, text: str) -> list[str]:
        return _pieces(text)

    def save(self, directory: Path) -> None:
        self._tokenizer.save(str(Path(directory) / FILE_NAME))
        (Path(directory) / CONFIG_NAME).unlink(missing_ok=True)  # without one, load_tokenizer reads "bpe"


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


def _byte_ids(tokenizer, byte_level: bool) -> np.ndarray | None:
    """The id of each single-byte token: byte-level BPE's 256 stand-in characters, or
    SentencePiece's byte-fallback tokens <0x00>..<0xFF>; None when the vocabulary lacks some."""
    names = _byte_alphabet().items() if byte_level else ((f"<0x{byte:02X}>", byte) for byte in range(256))
    ids = np.zeros(256, dtype=np.int32)
    for name, byte in names:
        index = tokenizer.token_to_id(name)
        if index is None:
            return None
        ids[byte] = index
    return ids


def _token_bytes(tokenizer, vocab_size: int, special_ids: set[int]) -> list[bytes] | None:
    """The bytes each id stands for (b"" for specials), so decode never goes through str; None
    unless the tokenizer is byte-level (its decoder, and every token of its model spelled in the
    256 stand-in characters). Added tokens that are not special stand for their text."""
    from tokenizers import decoders

    if not isinstance(tokenizer.decoder, decoders.ByteLevel):
        return None
    alphabet = _byte_alphabet()
    added = tokenizer.get_added_tokens_decoder()
    table = []
    for index in range(vocab_size):
        token = tokenizer.id_to_token(index)
        if index in special_ids or token is None or (index in added and added[index].special):
            table.append(b"")
        elif index in added:
            table.append(added[index].content.encode("utf-8"))
        elif all(char in alphabet for char in token):
            table.append(bytes(alphabet[char] for char in token))
        else:
            return None
    return table


def build_tokenizer(config, train_documents) -> Tokenizer:
    """The tokenizer ``config`` (a DataConfig) asks for, trained on ``train_documents`` if BPE;
    an hf tokenizer is checked to give the start of ``train_documents`` back unchanged."""
    if config.tokenizer == "bytes":
        return ByteTokenizer()
    if config.tokenizer == "bpe":
        return BPETokenizer.train(train_documents, config.bpe_vocab_size)
    tokenizer = load_hf_tokenizer(config.tokenizer.path)
    _check_lossless(tokenizer, train_documents, config.tokenizer.path)
    return tokenizer


def planned_vocab_size(config) -> int:
    """The vocabulary ``config`` (a DataConfig) asks for, before any data is read: a BPE may learn
    fewer ids than ``bpe_vocab_size`` from a small text."""
    if config.tokenizer == "bytes":
        return ByteTokenizer.vocab_size
    if config.tokenizer == "bpe":
        return config.bpe_vocab_size
    file = _tokenizer_file(config.tokenizer.path)
    return _vocab_size(_parse(file, _read(file)[0]))


def check_vocab_size(model_vocab_size: int, config, tokenizer_vocab_size: int, source: str | None = None) -> None:
    """Stop, naming both numbers, when the model's vocabulary is not the tokenizer's (``config``: the
    DataConfig): a larger one trains rows no id reaches, a smaller one fails at the first id beyond it."""
    if model_vocab_size == tokenizer_vocab_size:
        return
    tokenizer = {"bytes": "the bytes tokenizer",
                 "bpe": f"the bpe tokenizer (data.bpe_vocab_size={config.bpe_vocab_size})",
                 "hf": f"the hf tokenizer {getattr(config.tokenizer, 'path', '')}"}[config.tokenizer_kind]
    raise ConfigError(
        f"{source + ': ' if source else ''}model.vocab_size: {model_vocab_size} disagrees with {tokenizer}, which has "
        f"{tokenizer_vocab_size} ids; override model.vocab_size={tokenizer_vocab_size}, or set data.tokenizer to the "
        "tokenizer this config was made for")


def _check_lossless(tokenizer: Tokenizer, documents, name: str) -> None:
    """Bits per byte count the documents' bytes, so the tokenizer must give them back."""
    head = b"".join(document.text[:CHECK_BYTES] for document in documents[:8])[:CHECK_BYTES]
    text = head.decode("utf-8", "ignore").encode("utf-8")  # a character cut by the slice is not the tokenizer's fault
    back = tokenizer.decode(tokenizer.encode(text))
    if back != text:
        at = next((i for i, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
        raise DataError(f"{name}: this tokenizer does not give the training text back ({text[at:at + 20]!r} became "
                        f"{back[at:at + 20]!r} at byte {at}), so bits per byte would not count the text's own bytes; "
                        "use a lossless tokenizer (no normaliser, no unknown token)")


def load_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer saved in ``directory`` (a run directory)."""
    directory = Path(directory)
    if (directory / CONFIG_NAME).is_file():
        return load_hf_tokenizer(directory)
    path = directory / FILE_NAME
    source, data = _read(path)
    if data.get("kind") == "bytes":
        return ByteTokenizer()
    if (data.get("model") or {}).get("type") != "BPE":
        raise DataError(f"{path}: not a tokenizer file (neither kind 'bytes' nor a BPE model)")
    try:
        return BPETokenizer(_parse(path, source))
    except DataError as error:
        raise DataError(f"{path}: {error}") from None


def load_hf_tokenizer(path: str | Path) -> HFTokenizer:
    """The Hugging Face tokenizer in ``path`` (a tokenizer.json, or a folder holding one), with
    the BOS, EOS and PAD that the files beside it name, or found by their usual names."""
    file = _tokenizer_file(path)
    source, _ = _read(file)
    tokenizer = _parse(file, source)
    named = _named_specials(file.parent)
    chosen = {}
    for role in ("bos", "eos", "pad"):
        name, where = named.get(role, (None, None))
        if name is not None and tokenizer.token_to_id(name) is None:
            raise DataError(f"{where}: {role}_token {name!r} is not in {file}")
        chosen[role] = name or next((n for n in USUAL_NAMES[role] if tokenizer.token_to_id(n) is not None), None)
    if chosen["bos"] is None:
        raise DataError(f"{file}: no BOS token found (strata starts every document with one); name it as bos_token "
                        f"in {file.parent / CONFIG_NAME}")
    chosen["eos"] = chosen["eos"] or chosen["bos"]
    chosen["pad"] = chosen["pad"] or chosen["eos"]
    chat = read_chat_files(file.parent, _vocab_size(tokenizer))
    return HFTokenizer(tokenizer, (chosen["bos"], chosen["eos"], chosen["pad"]), source, chat)


def _tokenizer_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path / FILE_NAME if path.is_dir() else path


def _vocab_size(tokenizer) -> int:
    """The full vocabulary, added tokens included; and should a file leave holes in its ids, up to
    its largest id, which the model's embedding must hold."""
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    return max(tokenizer.get_vocab_size(with_added_tokens=True), largest + 1)


def _named_specials(folder: Path) -> dict[str, tuple[str, Path]]:
    """BOS/EOS/PAD as tokenizer_config.json, else special_tokens_map.json, in ``folder`` names them
    (a name, or {"content": name}; null counts as not named), each with the file naming it."""
    named = {}
    for file in (folder / CONFIG_NAME, folder / "special_tokens_map.json"):
        if not file.is_file():
            continue
        _, data = _read(file)
        for role in ("bos", "eos", "pad"):
            value = data.get(f"{role}_token")
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) and value and role not in named:
                named[role] = (value, file)
    return named


def _read(path: Path) -> tuple[bytes, dict]:
    """A JSON object file's bytes and content; DataError naming the file otherwise."""
    try:
        source = path.read_bytes()
        data = json.loads(source.decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no tokenizer file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a tokenizer file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a readable tokenizer file ({error})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a tokenizer file (top level is not an object)")
    return source, data


def _parse(path: Path, source: bytes):
    from tokenizers import Tokenizer as LibraryTokenizer

    try:
        return LibraryTokenizer.from_str(source.decode("utf-8"))
    except Exception as error:  # the Rust side raises a bare Exception for malformed files
        reason = str(error).partition("\n")[0]
        raise DataError(f"{path}: broken tokenizer file ({reason})") from None

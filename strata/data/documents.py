"""Text sources -> documents -> a deterministic train/validation split.

Everything that can be wrong with the input (missing paths, empty or binary files, a JSONL line
without the text field) is found here, at load time, so a run never dies hours in on bad data.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path

from strata.data.catalog import resolve
from strata.data.errors import DataError
from strata.data.jsonl import json_objects

# Only this much of a file is checked for NUL bytes / invalid UTF-8 to tell "binary" from "text".
SNIFF_BYTES = 64 * 1024
FOLDER_SUFFIXES = (".txt", ".md")


@dataclass
class Document:
    """One unit of text. ``name`` says where it came from: a file path, or ``file.jsonl:LINE``."""

    name: str
    text: bytes


def load_documents(sources: list[str], text_field: str = "text") -> list[Document]:
    """Every document of every source, in the order given (folders sorted, recursively).

    A source is a file (.jsonl: one document per line, the text under ``text_field``; anything
    else: the whole file is one document), a folder (all *.txt and *.md below it), or, when it
    names no file and has no path separator, a named data set such as ``shakespeare`` or ``udhr``
    (``strata data list``).
    """
    if not sources:
        raise DataError("no data sources given (data.sources is empty)")
    documents: list[Document] = []
    for source in sources:
        documents.extend(_load_source(str(source), text_field))
    return documents


def _load_source(source: str, text_field: str) -> list[Document]:
    path = resolve(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in FOLDER_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{source}: folder has no {' or '.join('*' + s for s in FOLDER_SUFFIXES)} files")
        return [Document(str(file), _read_text(file)) for file in files]
    if path.suffix == ".jsonl":
        return _load_jsonl(path, text_field)
    return [Document(str(path), _read_text(path))]


def _read_text(path: Path) -> bytes:
    """The file's bytes, refused if empty, unreadable, binary-looking or not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    if not data:
        raise DataError(f"{path}: file is empty")
    head = data[:SNIFF_BYTES]
    nul = head.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path}: looks binary (NUL byte at offset {nul}), not text")
    try:
        # final=False: a multi-byte character cut by the sniff window is not an error.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(data) <= SNIFF_BYTES)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: looks binary (not valid UTF-8 at byte {error.start}), not text") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 at byte {error.start}") from None
    return data


def _load_jsonl(path: Path, text_field: str) -> list[Document]:
    documents = []
    for where, record in json_objects(path, _read_text(path).decode("utf-8")):
        if text_field not in record:
            raise DataError(f"{where}: no field {text_field!r} (set data.text_field to the field holding the text)")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
        if text:
            documents.append(Document(where, text.encode("utf-8")))
    if not documents:
        raise DataError(f"{path}: no non-empty {text_field!r} values in any line")
    return documents


def split_documents(documents: list[Document], valid_fraction: float) -> tuple[list[Document], list[Document]]:
    """Hold out the last ``valid_fraction`` of every document's bytes for validation.

    Splitting inside each document (rather than holding out whole documents) keeps validation
    from the same distribution even for a single-file corpus, and needs no randomness. The cut
    moves to just after a newline when one lies at it or within 10% of the held-out length
    before it, so validation starts at the beginning of a line; otherwise it moves back at most
    three bytes to a character boundary, so both halves stay valid UTF-8 (which BPE needs).
    A document of fewer than two lines is not split: all of it trains.
    """
    train, valid = [], []
    for document in documents:
        cut = _cut_point(document.text, valid_fraction)
        if cut is None:
            train.append(document)
            continue
        train.append(Document(document.name, document.text[:cut]))
        valid.append(Document(document.name, document.text[cut:]))
    if not valid:
        names = ", ".join(d.name for d in documents[:3]) + (", ..." if len(documents) > 3 else "")
        raise DataError(
            f"no validation text: no document is long enough to split ({names}); "
            "each needs at least two lines and enough bytes for data.valid_fraction"
        )
    return train, valid


def _cut_point(text: bytes, valid_fraction: float) -> int | None:
    """Where validation starts in ``text``, or None if the document is too short to split."""
    if b"\n" not in text.rstrip(b"\n"):
        return None
    held_out = round(len(text) * valid_fraction)
    if held_out < 1 or held_out >= len(text):
        return None
    cut = len(text) - held_out
    slack = max(1, held_out // 10)
    newline = text.rfind(b"\n", cut - slack, cut + 1)
    if 0 <= newline < len(text) - 1:
        return newline + 1
    while cut > 0 and text[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: back to the character's start
        cut -= 1
    return cut or None

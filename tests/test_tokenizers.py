"""Byte and BPE tokenizers: exact round trips on any text, specials, saving and loading."""

import json

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from strata.config import DataConfig
from strata.data import (
    BPETokenizer,
    ByteTokenizer,
    DataError,
    Document,
    build_tokenizer,
    load_tokenizer,
    split_documents,
)

TRICKY = ["", "héllo wörld", "emoji 🎉👩‍👩‍👧 and CJK 漢字", "<bos>text<eos><pad>", "\r\n\t  \x00 \u200b", "𝕊𝕙𝕒𝕜𝕖"]


@pytest.fixture(scope="module")
def shakespeare(data_dir) -> bytes:
    return (data_dir / "corpora" / "shakespeare.txt").read_bytes()


@pytest.fixture(scope="module")
def bpe(shakespeare) -> BPETokenizer:
    """Trained on the first 400 KB only: seconds, and the rest of the file stays unseen."""
    return BPETokenizer.train([Document("slice", shakespeare[:400_000])], 600)


def round_trips(tokenizer, text: str) -> None:
    data = text.encode("utf-8")
    ids = tokenizer.encode(data)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert not set(ids.tolist()) & {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    assert tokenizer.decode(ids) == data


# ---------------------------------------------------------------------------------------------
# Bytes


def test_byte_tokenizer_ids_are_bytes_then_specials():
    tokenizer = ByteTokenizer()
    assert (tokenizer.kind, tokenizer.vocab_size) == ("bytes", 259)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (256, 257, 258)
    assert tokenizer.encode("aé".encode()).tolist() == [97, 0xC3, 0xA9]
    assert tokenizer.decode([256, 97, 0xC3, 257, 258]) == b"a\xc3"  # specials dropped; a cut character stays cut
    assert tokenizer.decode(torch.tensor([104, 105])) == b"hi"
    with pytest.raises(ValueError, match="token id 300 is outside"):
        tokenizer.decode([300])


@given(st.text())
@example("".join(TRICKY))
def test_byte_tokenizer_round_trips_any_text(text):
    round_trips(ByteTokenizer(), text)


# ---------------------------------------------------------------------------------------------
# BPE


def test_bpe_vocabulary_specials_and_compression(bpe, shakespeare):
    assert (bpe.kind, bpe.vocab_size) == ("bpe", 600)
    assert sorted([bpe.bos_id, bpe.eos_id, bpe.pad_id]) == [0, 1, 2]
    unseen = shakespeare[-50_000:]
    ids = bpe.encode(unseen)
    assert len(ids) < 0.5 * len(unseen)  # merges learned on one part of the corpus compress another
    assert bpe.decode(np.concatenate([[bpe.bos_id], ids, [bpe.eos_id]])) == unseen


def test_bpe_decode_returns_bytes_even_mid_character(bpe):
    ids = bpe.encode("🎉".encode())  # never seen in training: one token per byte
    assert len(ids) == 4
    assert bpe.decode(ids[:1]) == b"\xf0"


@settings(max_examples=200, deadline=None)
@given(st.text())
@pytest.mark.parametrize("extra", TRICKY)
def test_bpe_round_trips_any_text(bpe, extra, text):
    round_trips(bpe, extra + text)


@settings(max_examples=300, deadline=None)
@given(st.binary())
@example("the end of a truncated 🎉".encode()[:-2] + b"\xff and more")
def test_bpe_round_trips_bytes_that_are_not_utf8(bpe, data):
    """Truncation can cut a character in half (e.g. the first N bytes of a document); such bytes
    become single-byte tokens instead of an error."""
    ids = bpe.encode(data)
    assert bpe.decode(ids) == data and len(ids) <= len(data)


def test_save_and_load_round_trip(bpe, tmp_path, shakespeare):
    for tokenizer in (ByteTokenizer(), bpe):
        folder = tmp_path / tokenizer.kind
        folder.mkdir()
        tokenizer.save(folder)
        loaded = load_tokenizer(folder)
        assert type(loaded) is type(tokenizer)
        assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.pad_id) == (
            tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
        sample = shakespeare[:20_000] + "<eos> 🎉".encode()
        assert (loaded.encode(sample) == tokenizer.encode(sample)).all()
        assert loaded.decode(loaded.encode(sample)) == sample
    assert json.loads((tmp_path / "bpe" / "tokenizer.json").read_text())["model"]["type"] == "BPE"  # HF format


@pytest.mark.parametrize("content, message", [
    (None, "tokenizer.json: no tokenizer file"),
    ("{not json", "tokenizer.json: not a readable tokenizer file"),
    ('{"kind": "words"}', "tokenizer.json: not a tokenizer file"),
    ('{"model": {"type": "BPE", "vocab": 3}}', "tokenizer.json: broken BPE tokenizer file"),
])
def test_load_tokenizer_errors_name_the_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(DataError, match=message):
        load_tokenizer(tmp_path)


def test_build_tokenizer_follows_the_config(data_dir):
    documents = [Document("udhr/eng.txt", (data_dir / "udhr" / "eng.txt").read_bytes())]
    train, _ = split_documents(documents, 0.1)
    assert isinstance(build_tokenizer(DataConfig(tokenizer="bytes"), train), ByteTokenizer)
    bpe = build_tokenizer(DataConfig(tokenizer="bpe", bpe_vocab_size=300), train)
    assert isinstance(bpe, BPETokenizer) and bpe.vocab_size == 300

"""Byte, BPE and Hugging Face (hf) tokenizers: exact round trips on any text, specials, saving and
loading; an hf file's ids and decoded text are the ``tokenizers`` library's (and transformers') own."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tokenizer_files import BOS, EOS, llama_like, save_with_config, save_with_transformers
from tokenizers import Tokenizer as LibraryTokenizer

from strata.config import ConfigError, DataConfig, load_config
from strata.data import (
    BPETokenizer,
    ByteTokenizer,
    DataError,
    Document,
    HFTokenizer,
    build_tokenizer,
    check_vocab_size,
    corpus_path,
    dataset_path,
    load_hf_tokenizer,
    load_tokenizer,
    planned_vocab_size,
    split_documents,
)

TRANSFORMER = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "transformer.yaml"
TRICKY = ["", "héllo wörld", "emoji 🎉👩‍👩‍👧 and CJK 漢字", "<bos>text<eos><pad>", "\r\n\t  \x00 \u200b", "𝕊𝕙𝕒𝕜𝕖"]


@pytest.fixture(scope="module")
def shakespeare() -> bytes:
    return corpus_path("shakespeare").read_bytes()


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
    ('{"model": {"type": "BPE", "vocab": 3}}', "tokenizer.json: broken tokenizer file"),
])
def test_load_tokenizer_errors_name_the_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(DataError, match=message):
        load_tokenizer(tmp_path)


def test_build_tokenizer_follows_the_config():
    documents = [Document("udhr/eng.txt", (dataset_path("udhr") / "eng.txt").read_bytes())]
    train, _ = split_documents(documents, 0.1)
    assert isinstance(build_tokenizer(DataConfig(tokenizer="bytes"), train), ByteTokenizer)
    bpe = build_tokenizer(DataConfig(tokenizer="bpe", bpe_vocab_size=300), train)
    assert isinstance(bpe, BPETokenizer) and bpe.vocab_size == 300


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer files (data.tokenizer: {kind: hf, path: ...})


@pytest.fixture(scope="module")
def llama_dir(shakespeare, tmp_path_factory):
    """A Llama-3 style tokenizer trained on the first 400 KB, saved with a tokenizer_config.json."""
    tokenizer = llama_like(shakespeare[:400_000].decode())
    return save_with_config(tokenizer, tmp_path_factory.mktemp("llama"), bos_token=BOS, eos_token=EOS)


@pytest.fixture(scope="module")
def reference(llama_dir):
    """The same file in the ``tokenizers`` library itself, the reference for ids and text."""
    return LibraryTokenizer.from_file(str(llama_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def llama(llama_dir) -> HFTokenizer:
    return load_hf_tokenizer(llama_dir)


def test_hf_ids_and_text_are_the_librarys_own(llama, reference, shakespeare):
    assert (llama.kind, llama.vocab_size) == ("hf", reference.get_vocab_size(with_added_tokens=True))
    assert (llama.bos_id, llama.eos_id) == (reference.token_to_id(BOS), reference.token_to_id(EOS))
    assert llama.pad_id == llama.eos_id  # no pad token named or found: padding is never scored
    unseen = shakespeare[-300_000:].decode()  # blank lines ("\n\n" is one Llama-3 token) and all
    expected = reference.encode(unseen, add_special_tokens=False).ids
    ids = llama.encode(unseen.encode())
    assert ids.dtype == np.int32 and ids.tolist() == expected
    assert len(ids) < 0.5 * len(unseen)
    assert llama.decode(ids) == reference.decode(expected).encode() == unseen.encode()
    for text in TRICKY:
        assert llama.encode(text.encode()).tolist() == reference.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def text_only_reference(llama_dir):
    """The library asked, as strata asks it, to read text that spells a special token as text."""
    tokenizer = LibraryTokenizer.from_file(str(llama_dir / "tokenizer.json"))
    tokenizer.encode_special_tokens = True
    return tokenizer


@settings(max_examples=100, deadline=None)
@given(st.text())
@example("".join(TRICKY) + BOS + EOS)
def test_hf_round_trips_any_text_and_keeps_specials_as_text(llama, text_only_reference, text):
    round_trips(llama, text)
    assert llama.encode(text.encode()).tolist() == text_only_reference.encode(text, add_special_tokens=False).ids


@settings(max_examples=100, deadline=None)
@given(st.binary())
@example("cut 🎉".encode()[:-2] + b"\xff and more")
def test_hf_byte_level_round_trips_bytes_that_are_not_utf8(llama, data):
    assert llama.decode(llama.encode(data)) == data


def test_hf_folder_saved_by_transformers(llama_dir, tmp_path, shakespeare):
    fast = save_with_transformers(llama_dir / "tokenizer.json", tmp_path / "hf")
    tokenizer = load_hf_tokenizer(tmp_path / "hf")  # a folder; BOS/EOS from transformers' tokenizer_config.json
    assert tokenizer.vocab_size == len(fast)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (fast.bos_token_id, fast.eos_token_id)
    text = shakespeare[-20_000:].decode()
    ids = fast(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.encode(text.encode()).tolist() == ids
    assert tokenizer.decode(ids) == fast.decode(ids).encode()


def test_hf_specials_found_by_their_usual_names(llama_dir, tmp_path, shakespeare):
    bare = tmp_path / "bare.json"  # a file with nothing beside it
    bare.write_bytes((llama_dir / "tokenizer.json").read_bytes())
    tokenizer = load_hf_tokenizer(bare)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 1)

    gpt2 = save_with_config(llama_like(shakespeare[:100_000].decode(), 400), tmp_path / "gpt2")
    data = json.loads((gpt2 / "tokenizer.json").read_text())  # renamed as GPT-2 names it: BOS = EOS
    data["added_tokens"][0]["content"] = "<|endoftext|>"
    data["model"]["vocab"] = {("<|endoftext|>" if k == BOS else k): v for k, v in data["model"]["vocab"].items()}
    (gpt2 / "tokenizer.json").write_text(json.dumps(data))
    (gpt2 / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    tokenizer = load_hf_tokenizer(gpt2)
    assert tokenizer.bos_id == tokenizer.eos_id == 0

    del data["added_tokens"][0]
    data["model"]["vocab"] = {k: v for k, v in data["model"]["vocab"].items() if k != "<|endoftext|>"}
    (gpt2 / "tokenizer.json").write_text(json.dumps(data))
    (gpt2 / "special_tokens_map.json").unlink()
    with pytest.raises(DataError, match=r"tokenizer.json: no BOS token found .* bos_token in .*tokenizer_config.json"):
        load_hf_tokenizer(gpt2)


def test_hf_saved_in_a_run_directory_is_the_file_itself(llama, llama_dir, reference, tmp_path, shakespeare):
    llama.save(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (llama_dir / "tokenizer.json").read_bytes()
    loaded = load_tokenizer(tmp_path)  # a run directory: no path to the original needed
    assert type(loaded) is HFTokenizer
    assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.pad_id) == (
        llama.vocab_size, llama.bos_id, llama.eos_id, llama.pad_id)
    text = shakespeare[:20_000].decode()
    assert loaded.encode(text.encode()).tolist() == reference.encode(text, add_special_tokens=False).ids
    ByteTokenizer().save(tmp_path)  # the same folder reused by a byte run: nothing of the hf one is read
    assert type(load_tokenizer(tmp_path)) is ByteTokenizer


@pytest.mark.parametrize("name, content, message", [
    ("missing", None, "missing: no tokenizer file"),
    ("", None, "tokenizer.json: no tokenizer file"),  # a folder without one
    ("t.json", "{oops", "t.json: not a readable tokenizer file"),
    ("t.json", '{"model": 3}', "t.json: broken tokenizer file"),
])
def test_hf_file_errors_name_the_path(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message) as error:
        load_hf_tokenizer(tmp_path / name)
    assert "\n" not in str(error.value) and str(tmp_path) in str(error.value)


def test_hf_config_naming_a_missing_token(llama_dir, tmp_path):
    save_with_config(LibraryTokenizer.from_file(str(llama_dir / "tokenizer.json")), tmp_path, bos_token="<s>")
    with pytest.raises(DataError, match=r"tokenizer_config.json: bos_token '<s>' is not in .*tokenizer.json"):
        load_hf_tokenizer(tmp_path)


def test_hf_tokenizer_that_loses_text_is_refused(tmp_path, shakespeare):
    """A lowercasing normaliser would make bits per byte count bytes the model never had to predict."""
    from tokenizers import normalizers

    tokenizer = llama_like(shakespeare[:100_000].decode(), 400)
    tokenizer.normalizer = normalizers.Lowercase()
    save_with_config(tokenizer, tmp_path, bos_token=BOS)
    config = DataConfig(tokenizer={"kind": "hf", "path": str(tmp_path)})
    with pytest.raises(DataError, match="does not give the training text back"):
        build_tokenizer(config, [Document("slice", shakespeare[:10_000])])


def test_data_tokenizer_forms(llama_dir):
    config = load_config(TRANSFORMER, [f"data.tokenizer={{kind: hf, path: {llama_dir}}}"])
    assert config.data.tokenizer_kind == "hf" and config.data.tokenizer.path == str(llama_dir)
    assert planned_vocab_size(config.data) == 1000
    assert load_config(TRANSFORMER, [f"data.tokenizer.path={llama_dir}"]).data.tokenizer_kind == "hf"  # kind implied
    assert load_config(TRANSFORMER, ["data.tokenizer=bpe"]).data.tokenizer == "bpe"
    for override, message in [("data.tokenizer=words", "data.tokenizer: expected bytes, bpe or {kind: hf"),
                              ("data.tokenizer={kind: hf}", "data.tokenizer.path: required"),
                              ("data.tokenizer={kind: bpe}", "data.tokenizer.kind: expected hf"),
                              ("data.tokenizer={path: x, size: 3}", "data.tokenizer.size: unknown key")]:
        with pytest.raises(ConfigError, match=message.replace("{", r"\{")):
            load_config(TRANSFORMER, [override])


def test_vocab_size_check_names_both_numbers_and_the_fix():
    check_vocab_size(259, DataConfig(), 259)
    with pytest.raises(ConfigError) as error:
        check_vocab_size(128256, DataConfig(), 259, "preset.yaml")
    assert str(error.value) == ("preset.yaml: model.vocab_size: 128256 disagrees with the bytes tokenizer, which has 259 "
                                "ids; override model.vocab_size=259, or set data.tokenizer to the tokenizer this config "
                                "was made for")
    with pytest.raises(ConfigError, match=r"bpe tokenizer \(data.bpe_vocab_size=512\), which has 500 ids"):
        check_vocab_size(512, DataConfig(tokenizer="bpe", bpe_vocab_size=512), 500)

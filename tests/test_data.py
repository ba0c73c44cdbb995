"""Documents, the train/validation split, packing and the token loader (named data: test_named_data.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from strata.data import (
    UDHR_SAMPLE,
    ByteTokenizer,
    DataError,
    Document,
    TokenLoader,
    corpus_path,
    dataset_path,
    load_documents,
    pack,
    split_documents,
)

# ---------------------------------------------------------------------------------------------
# load_documents


def test_text_file_folder_and_jsonl_sources(tmp_path):
    (tmp_path / "one.txt").write_text("first file\n")
    folder = tmp_path / "notes"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "z.md").write_text("# deep\n")
    (folder / "a.txt").write_text("top\n")
    (folder / "skip.json").write_text("{}")
    lines = [{"text": "héllo"}, {"text": "world", "other": 1}]
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(x) for x in lines[:1]) + "\n\n" + json.dumps(lines[1]))

    documents = load_documents([str(tmp_path / "one.txt"), str(folder), str(tmp_path / "items.jsonl")])

    assert [(Path(d.name).name, d.text) for d in documents] == [
        ("one.txt", b"first file\n"),
        ("a.txt", b"top\n"),
        ("z.md", b"# deep\n"),
        ("items.jsonl:1", "héllo".encode()),
        ("items.jsonl:3", b"world"),  # blank line 2 skipped; numbers are file lines
    ]


def test_jsonl_text_field_on_a_real_task_file(tasks_dir):
    """udhr-language: inputs in many scripts, each with a newline before ``Language:``."""
    path = tasks_dir / "udhr-language.jsonl"
    documents = load_documents([str(path)], text_field="input")
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert len(documents) == 60
    assert documents[0] == Document(f"{path}:1", first["input"].encode())


def test_named_corpus_reads_the_file_corpus_path_gives():
    (document,) = load_documents(["shakespeare"])
    assert Path(document.name) == corpus_path("shakespeare")
    assert document.text.startswith(b"# A Midsummer Night's Dream")


def _unreadable(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("secret\n")
    real = Path.read_bytes

    def refuse(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    # chmod 000 does not stop root, which CI may be; simulate the refusal instead.
    monkeypatch.setattr(Path, "read_bytes", refuse)
    return [str(path)], "locked.txt: cannot read (Permission denied)"


def _case(name, tmp_path):
    """(sources, expected message fragment) for each bad-input case."""
    if name == "missing":
        return [str(tmp_path / "nope" / "gone.txt")], "gone.txt: no such file or folder"
    if name == "empty":
        (tmp_path / "empty.txt").write_bytes(b"")
        return [str(tmp_path / "empty.txt")], "empty.txt: file is empty"
    if name == "nul":
        (tmp_path / "model.bin").write_bytes(b"abc\0\x01\x02")
        return [str(tmp_path / "model.bin")], "model.bin: looks binary (NUL byte at offset 3)"
    if name == "not-utf8":
        (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
        return [str(tmp_path / "latin1.txt")], "latin1.txt: looks binary (not valid UTF-8 at byte 3)"
    if name == "bad-utf8-late":
        (tmp_path / "late.txt").write_bytes(b"a" * 70_000 + b"\xff\n")
        return [str(tmp_path / "late.txt")], "late.txt: not valid UTF-8 at byte 70000"
    if name == "empty-folder":
        (tmp_path / "blank" / "sub").mkdir(parents=True)
        (tmp_path / "blank" / "sub" / "data.csv").write_text("a,b\n")
        return [str(tmp_path / "blank")], "blank: folder has no *.txt or *.md files"
    if name == "jsonl-field":
        (tmp_path / "rows.jsonl").write_text('{"text": "ok"}\n{"body": "no text here"}\n')
        return [str(tmp_path / "rows.jsonl")], "rows.jsonl:2: no field 'text'"
    if name == "jsonl-json":
        (tmp_path / "rows.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
        return [str(tmp_path / "rows.jsonl")], "rows.jsonl:2: not valid JSON"
    if name == "jsonl-type":
        (tmp_path / "rows.jsonl").write_text('{"text": ["a", "b"]}\n')
        return [str(tmp_path / "rows.jsonl")], "rows.jsonl:1: field 'text' is list, not a string"
    if name == "unknown-corpus":
        return ["wikipedia"], ("wikipedia: no such file, folder or named data set (known: shakespeare, sotu, udhr, "
                               "sotu-next-sentence, sotu-word-order, udhr-language)")
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["missing", "empty", "nul", "not-utf8", "bad-utf8-late", "empty-folder",
                                  "jsonl-field", "jsonl-json", "jsonl-type", "unknown-corpus", "unreadable"])
def test_bad_input_raises_one_line_naming_the_problem(name, tmp_path, monkeypatch):
    sources, expected = _unreadable(tmp_path, monkeypatch) if name == "unreadable" else _case(name, tmp_path)
    with pytest.raises(DataError) as error:
        load_documents(sources)
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_no_sources_is_an_error():
    with pytest.raises(DataError, match="no data sources"):
        load_documents([])


# ---------------------------------------------------------------------------------------------
# split_documents


def test_split_is_deterministic_and_loses_no_bytes():
    # The 30 languages of UDHR_SAMPLE: every one of them splits (a few of the package's 532
    # declarations are one line long and train whole), whichever copy of the folder is read.
    udhr = dataset_path("udhr")
    documents = load_documents([str(corpus_path("shakespeare")), *(str(udhr / f"{code}.txt") for code in UDHR_SAMPLE)])
    train, valid = split_documents(documents, 0.05)
    assert (train, valid) == split_documents(documents, 0.05)
    assert len(train) == len(valid) == len(documents)
    for document, head, tail in zip(documents, train, valid):
        assert head.name == tail.name == document.name
        assert head.text + tail.text == document.text
        head.text.decode("utf-8"), tail.text.decode("utf-8")  # never cut inside a character
        assert abs(len(tail.text) - 0.05 * len(document.text)) <= 0.1 * 0.05 * len(document.text) + 3
    assert train[0].text.endswith(b"\n")  # Shakespeare has a newline near every cut: lines stay whole


def test_cut_moves_back_to_a_newline_within_the_slack():
    text = b"x" * 900 + b"\n" + b"y" * 99  # 1000 bytes; 10% held out = 100; slack = 10
    (train,), (valid,) = split_documents([Document("d", text)], 0.1)
    assert valid.text == b"y" * 99 and train.text.endswith(b"\n")
    far = b"x" * 850 + b"\n" + b"y" * 149  # the newline is 49 bytes before the cut: too far to move
    (train,), (valid,) = split_documents([Document("d", far)], 0.1)
    assert len(valid.text) == 100 and valid.text == b"y" * 100
    accents = b"line\n" + "é".encode() * 500  # no newline near the cut: back to a character boundary
    (train,), (valid,) = split_documents([Document("d", accents)], 0.1)
    assert len(valid.text) == 100 and valid.text.decode() == "é" * 50
    assert train.text.decode() == "line\n" + "é" * 450


def test_short_documents_go_wholly_to_training():
    documents = [Document("one-line", b"a single line without a break " * 10 + b"\n"), Document("long", b"ab\n" * 100)]
    train, valid = split_documents(documents, 0.2)
    assert train[0] == documents[0]
    assert [d.name for d in valid] == ["long"]


def test_no_validation_text_is_an_error_naming_the_documents():
    with pytest.raises(DataError, match="no validation text.*tiny.txt"):
        split_documents([Document("tiny.txt", b"one line only\n")], 0.05)


# ---------------------------------------------------------------------------------------------
# pack and TokenLoader


def test_pack_puts_bos_before_every_document():
    tokenizer = ByteTokenizer()
    documents = [Document("a", b"ab"), Document("b", b"\xc3\xa9"), Document("c", b"xyz")]
    stream = pack(documents, tokenizer)
    assert stream.dtype == np.int32
    assert stream.tolist() == [256, 97, 98, 256, 0xC3, 0xA9, 256, 120, 121, 122]


def batches(loader, count):
    return [loader.next_batch().tokens for _ in range(count)]


def test_loader_batches_are_windows_and_depend_only_on_the_seed():
    tokens = np.arange(1000, dtype=np.int32)
    first = batches(TokenLoader(tokens, 16, 4, seed=3), 5)
    again = batches(TokenLoader(tokens, 16, 4, seed=3), 5)
    other = batches(TokenLoader(tokens, 16, 4, seed=4), 5)
    assert all((a == b).all() for a, b in zip(first, again))
    assert any((a != b).any() for a, b in zip(first, other))
    batch = first[0]
    assert batch.shape == (4, 17) and batch.dtype.is_floating_point is False and batch.dtype.itemsize == 8
    assert (batch[:, 1:] - batch[:, :-1] == 1).all() and (batch[:, 0] % 16 == 0).all()


def test_loader_state_round_trip_continues_identically_across_epochs():
    tokens = np.arange(10 * 8 + 1, dtype=np.int32)  # 10 windows of 8; 3 a batch -> epochs end mid-batch
    original = TokenLoader(tokens, 8, 3, seed=11)
    batches(original, 7)
    state = json.loads(json.dumps(original.state_dict()))
    assert state["epoch"] == 2 and state["position"] == 1
    resumed = TokenLoader(tokens, 8, 3, seed=11)
    resumed.load_state_dict(state)
    for expected, got in zip(batches(original, 5), batches(resumed, 5)):
        assert (expected == got).all()


def test_every_token_is_a_target_exactly_once_per_epoch():
    seq_len, n_windows = 8, 12
    tokens = np.arange(n_windows * seq_len + 1, dtype=np.int32)
    loader = TokenLoader(tokens, seq_len, 4, seed=0)
    for epoch in range(2):
        targets = np.concatenate([b[:, 1:].reshape(-1).numpy() for b in batches(loader, n_windows // 4)])
        assert sorted(targets.tolist()) == list(range(1, len(tokens)))
        assert loader.state_dict()["epoch"] == epoch + 1


def test_loader_cuts_levels_into_the_same_windows_as_tokens():
    tokens = np.arange(200, dtype=np.int32)
    levels = (tokens % 3).astype(np.int8)
    loader = TokenLoader(tokens, 16, 4, seed=2, levels=levels)
    for _ in range(6):
        batch = loader.next_batch()
        assert torch.equal(batch.levels, batch.tokens % 3)
        inputs = batch.inputs()
        assert torch.equal(inputs["tokens"], batch.tokens[:, :-1]) and torch.equal(inputs["levels"], batch.levels[:, :-1])
        assert torch.equal(batch.targets, batch.tokens[:, 1:])
    assert "levels" not in TokenLoader(tokens, 16, 4, seed=2).next_batch().inputs()


def test_loader_refuses_a_stream_shorter_than_one_window_and_foreign_state():
    with pytest.raises(DataError, match="9 tokens, shorter than one window of seq_len \\+ 1 = 10"):
        TokenLoader(np.arange(9, dtype=np.int32), 9, 2, seed=0)
    state = TokenLoader(np.arange(100, dtype=np.int32), 9, 2, seed=0).state_dict()
    with pytest.raises(DataError, match="seq_len=9 but this run has seq_len=10"):
        TokenLoader(np.arange(100, dtype=np.int32), 10, 2, seed=0).load_state_dict(state)

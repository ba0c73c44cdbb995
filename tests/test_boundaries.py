"""``strata eval RUN --boundaries FILE``: where an AU-Net splits a text. The statistics against
counts made by hand, the page as a real browser (headless Chromium) reads it, and the command
end to end with its two refusals."""

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from cli_runner import ROOT, strata

from strata.cli import main
from strata.config import load_config
from strata.data import ByteTokenizer
from strata.evals.boundaries import (
    PAGE,
    boundary_stats,
    find_levels,
    write_boundary_page,
)
from strata.models import build_model
from strata.train.runs import TrainedModel, save_as_run

# The word rule splits on the whitespace that ends a word; its deepest level also on the first
# character of a punctuation run. Bytes: T0 h1 e2 _3 c4 a5 t6 _7 s8 a9 t10 _11 o12 n13 _14 t15
# h16 e17 _18 m19 a20 t21 .22 (23 bytes).
TEXT = b"The cat sat on the mat."
WORDS = [3, 7, 11, 14, 18]  # every word's ending space; "mat." has none
PAIRS = [7, 14]  # the space after every 2nd word: "The cat ", "sat on "; "the mat." has no 2nd space
FULL_STOP = 22


def aunet(preset: str, *overrides: str) -> TrainedModel:
    """A tiny AU-Net with random weights (the split rule does not read them)."""
    config = load_config(ROOT / "configs" / "tiny" / f"{preset}.yaml", list(overrides))
    return TrainedModel(config, build_model(config), ByteTokenizer(), Path(preset))


def test_aunet2_word_rule_statistics_counted_by_hand():
    trained = aunet("aunet2")
    levels = find_levels(trained.model, trained.tokenizer, TEXT)
    # Two stages: the word level is also the deepest, so the full stop splits at level 1 too.
    assert np.flatnonzero(levels).tolist() == [*WORDS, FULL_STOP] and set(levels.tolist()) == {0, 1}
    [stage2] = boundary_stats(TEXT, levels, 2)
    assert stage2["stage"] == 2 and stage2["positions"] == 6
    assert stage2["bytes_per_position"] == pytest.approx(23 / 6)
    assert (stage2["space"], stage2["punctuation"], stage2["elsewhere"]) == pytest.approx((5 / 6, 1 / 6, 0))


def test_aunet3_word_rule_statistics_counted_by_hand():
    trained = aunet("aunet3")
    levels = find_levels(trained.model, trained.tokenizer, TEXT)
    # Level 2 (stages 2 and 3): every 2nd word's space and, deepest, the full stop; level 1 the rest.
    assert np.flatnonzero(levels == 2).tolist() == [*PAIRS, FULL_STOP]
    assert np.flatnonzero(levels == 1).tolist() == [3, 11, 18]
    stage2, stage3 = boundary_stats(TEXT, levels, 3)
    assert (stage2["positions"], stage3["positions"]) == (6, 3)
    assert (stage2["bytes_per_position"], stage3["bytes_per_position"]) == pytest.approx((23 / 6, 23 / 3))
    assert (stage3["space"], stage3["punctuation"], stage3["elsewhere"]) == pytest.approx((2 / 3, 1 / 3, 0))
    # A split inside a character, or on a letter or digit, is "elsewhere"; with no split, no shares.
    levels = np.array([0, 1, 0, 2, 0])  # "é" is bytes 0-1: a split on its first byte; "1" at byte 3
    stage2, stage3 = boundary_stats("éa1b".encode(), levels, 3)
    assert stage2["elsewhere"] == 1 and stage3["positions"] == 1
    [empty] = boundary_stats(b"abc", np.zeros(3, int), 2)
    assert empty["positions"] == 0 and empty["bytes_per_position"] is None and empty["space"] is None


def test_long_texts_are_read_in_windows_each_opened_by_bos():
    # context_length 9: BOS + 8 bytes a window, "ab cd ef" | " gh ij k" | "l ". The rule starts
    # afresh in each window: the 2nd window's leading space ends no word, and word pairs are counted
    # from the window's start ("gh ij "), so the splits differ from one reading of the whole text
    # (spaces 2, 5, 8, 11, 14, 17; pairs at 5, 11, 17).
    trained = aunet("aunet3", "model.context_length=9")
    levels = find_levels(trained.model, trained.tokenizer, b"ab cd ef gh ij kl ", batch_size=2)
    assert {int(i): int(levels[i]) for i in np.flatnonzero(levels)} == {2: 1, 5: 2, 11: 1, 14: 2, 17: 1}


class Dom(HTMLParser):
    """The dumped DOM as a tree: each element {"tag", "attrs", "children", "parent"}, text as str."""

    VOID = frozenset({"meta", "br", "link", "img", "hr", "input", "area", "base", "col", "embed", "source", "track",
                      "wbr"})

    def __init__(self, markup: str):
        super().__init__(convert_charrefs=True)
        self.root = {"tag": "#root", "attrs": {}, "children": [], "parent": None}
        self.current = self.root
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = {"tag": tag, "attrs": dict(attrs), "children": [], "parent": self.current}
        self.current["children"].append(node)
        if tag not in self.VOID:
            self.current = node

    def handle_endtag(self, tag):
        node = self.current
        while node is not self.root and node["tag"] != tag:
            node = node["parent"]
        if node is not self.root:
            self.current = node["parent"]

    def handle_data(self, data):
        self.current["children"].append(data)

    def elements(self, node=None):
        for child in (node or self.root)["children"]:
            if isinstance(child, dict):
                yield child
                yield from self.elements(child)

    def by_id(self, name):
        return next(element for element in self.elements() if element["attrs"].get("id") == name)


def text_of(node, exact: bool = False):
    """The text content of ``node`` (str); ``exact``: bytes, a ``data-bytes`` element giving its own."""
    if exact and "data-bytes" in node["attrs"]:
        return bytes.fromhex(node["attrs"]["data-bytes"])
    parts = [child if isinstance(child, str) else text_of(child, exact) for child in node["children"]]
    return b"".join(part.encode() if isinstance(part, str) else part for part in parts) if exact else "".join(parts)


def chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def test_the_page_in_a_headless_browser(tmp_path):
    browser = chromium()
    if browser is None:  # a developer's machine may lack one; CI must not pass without the check
        message = "no chromium binary on PATH (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # HTML's own characters, a newline, a tab, accents, a CR (a control), NUL and an undecodable
    # byte; context_length 16 makes windows of 15 bytes, so there are tails and window starts.
    clean = 'The <b>cat</b> & "dog"\n\tsat on the café mat. '
    text = clean.encode() + b"\r\n\x00\xff end"
    trained = aunet("aunet3", "model.context_length=16")
    result = write_boundary_page(trained, text, tmp_path / "out", "sample.txt")
    page = Path(result["page"])
    assert page == tmp_path / "out" / PAGE
    source = page.read_text(encoding="utf-8")
    assert "<script" not in source and "<link" not in source and "src=" not in source and "url(" not in source

    dumped = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox",
                             f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                            capture_output=True, timeout=120, check=True).stdout
    dom = Dom(dumped.decode("utf-8"))
    levels = find_levels(trained.model, trained.tokenizer, text)
    stats = boundary_stats(text, levels, 3)

    # The table: one row per stage, with the statistics.
    table = dom.by_id("boundary-stats")
    rows = [row for row in dom.elements(table) if row["tag"] == "tr" and "id" in row["attrs"]]
    assert [row["attrs"]["id"] for row in rows] == ["stage-2", "stage-3"]
    for row, expected in zip(rows, stats, strict=True):
        cells = {cell["attrs"]["class"]: cell for cell in row["children"] if isinstance(cell, dict)}
        assert int(cells["positions"]["attrs"]["data-value"]) == expected["positions"] > 0
        assert text_of(cells["positions"]) == str(expected["positions"])
        mean = cells["bytes-per-position"]
        assert float(mean["attrs"]["data-value"]) == pytest.approx(expected["bytes_per_position"])
        assert text_of(mean) == f"{expected['bytes_per_position']:.2f}"
        for name in ("space", "punctuation", "elsewhere"):
            assert float(cells[name]["attrs"]["data-value"]) == pytest.approx(expected[name])
            assert text_of(cells[name]) == f"{100 * expected[name]:.1f}\xa0%"

    # The text area: one data-stage segment per split, on its split byte, nested in the next stage's.
    area = dom.by_id("boundary-text")
    segments = [element for element in dom.elements(area) if "data-stage" in element["attrs"]]
    for stage in (2, 3):
        at = [int(s["attrs"]["data-byte"]) for s in segments if s["attrs"]["data-stage"] == str(stage)]
        assert at == np.flatnonzero(levels >= stage - 1).tolist()
    for segment in segments:
        if segment["attrs"]["data-stage"] == "2":
            parent = segment["parent"]
            assert "seg" in parent["attrs"]["class"] and "s3" in parent["attrs"]["class"].split()
    assert sum("data-tail" in element["attrs"] for element in dom.elements(area)) > 0  # window ends
    assert sum(element["attrs"].get("class") == "bos" for element in dom.elements(area)) == -(-len(text) // 15)
    # Its text is the input: as characters (a control in caret form, an undecodable byte as U+FFFD),
    # and byte for byte through data-bytes.
    assert text_of(area) == clean + "^M\n^@\ufffd end"
    assert text_of(area, exact=True) == text


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run directory of a tiny AU-Net-2 (context 64), written by strata itself (``save_as_run``:
    config, tokenizer, a checkpoint). Training one through the CLI (``cli_runner.train_tiny``)
    would take 10-40 s here, mostly its closing sample, and the split rule reads no weights."""
    return save_as_run(aunet("aunet2", "model.context_length=64"), tmp_path_factory.mktemp("boundaries") / "run")


def test_strata_eval_boundaries_prints_the_table_and_writes_the_page(run, tmp_path):
    text = tmp_path / "cat.txt"
    text.write_bytes(TEXT)
    output = strata("eval", run, "--boundaries", text).stdout.decode()
    assert "boundaries of" in output and "23 bytes, 1 window(s) of 64 tokens" in output
    row = next(line for line in output.splitlines() if line.startswith("│ 2 "))
    assert [cell.strip() for cell in row.split("│")[1:-1]] == ["2", "6", "3.83", "83.3 %", "16.7 %", "0.0 %"]
    assert f"page: {run / 'evals' / PAGE}" in output
    assert 'id="stage-2"' in (run / "evals" / PAGE).read_text(encoding="utf-8")


def test_boundaries_out_and_json(run, tmp_path, capsys):
    text = tmp_path / "cat.txt"
    text.write_bytes(TEXT)
    assert main(["eval", str(run), "--boundaries", str(text), "--out", str(tmp_path / "pages"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["boundaries"]
    assert result["page"] == str(tmp_path / "pages" / PAGE) and (tmp_path / "pages" / PAGE).is_file()
    assert result["stages"][0]["positions"] == 6 and result["windows"] == 1


def test_boundaries_refuse_a_missing_file_and_a_model_that_is_not_an_aunet(run, tmp_path, capsys):
    assert main(["eval", str(run), "--boundaries", str(tmp_path / "missing.txt")]) == 2
    assert capsys.readouterr().err == (f"strata: error: {tmp_path / 'missing.txt'}: cannot read the --boundaries text "
                                       "(No such file or directory)\n")
    config = load_config(ROOT / "configs" / "tiny" / "byte-transformer.yaml")
    lm = save_as_run(TrainedModel(config, build_model(config), ByteTokenizer(), Path("random")), tmp_path / "lm")
    (tmp_path / "cat.txt").write_bytes(TEXT)
    assert main(["eval", str(lm), "--boundaries", str(tmp_path / "cat.txt")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"strata: error: --boundaries needs an AU-Net model: {lm} is a language model")
    assert error.count("\n") == 1

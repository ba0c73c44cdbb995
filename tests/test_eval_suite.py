"""The evaluation suite's own parts: bits per character, loss by position, languages, saved
records, the comparison across runs, and ``strata eval`` writing JSON, Markdown and PNGs."""

import json
import math

import pytest
from cli_runner import strata, train_tiny
from matplotlib.image import imread
from test_bpb import Uniform

from strata.data import ByteTokenizer, DataError, Document, corpus_path, dataset_path
from strata.evals.characters import TASKS
from strata.evals.languages import evaluate_languages, languages_markdown
from strata.evals.long_context import _buckets, loss_by_position
from strata.evals.report import load_evaluations, save_evaluation
from strata.inference.bpb import bits_per_byte, count_chars

UNIFORM_BITS = math.log2(256)  # Uniform(259, 256): equal odds on the 256 byte values


def assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(path).ndim == 3


def test_count_chars_counts_characters_and_undecodable_bytes():
    assert count_chars("aé🎉".encode()) == 3
    assert count_chars(b"\xff\xfeab") == 4
    assert count_chars(b"") == 0


def test_bits_per_character_of_a_uniform_byte_model():
    text = "Ünïcödé 🎉\n".encode() * 4
    result = bits_per_byte(Uniform(259, 256), ByteTokenizer(), [Document("u", text)], seq_len=16)
    assert result["bpb"] == pytest.approx(UNIFORM_BITS)
    assert result["chars"] == count_chars(text)
    assert result["bpc"] == pytest.approx(UNIFORM_BITS * len(text) / count_chars(text))


def test_buckets_double_and_cover_the_window():
    assert _buckets(100) == [(0, 16), (16, 32), (32, 64), (64, 100)]
    assert _buckets(10) == [(0, 10)]


def test_loss_by_position_of_a_uniform_model_is_flat():
    documents = [Document("a", bytes(range(32, 127)) * 10), Document("short", b"tiny")]
    result = loss_by_position(Uniform(259, 256), ByteTokenizer(), documents, length=64, batch_size=3)
    assert result["windows"] == 950 // 64
    assert [b["start"] for b in result["buckets"]] == [0, 16, 32]
    assert all(b["bpb"] == pytest.approx(UNIFORM_BITS) for b in result["buckets"])
    with pytest.raises(DataError, match="no document has 2,000 tokens for one window"):
        loss_by_position(Uniform(259, 256), ByteTokenizer(), documents, length=2000)


def test_languages_report_each_file_with_its_name(tmp_path):
    (tmp_path / "index.tsv").write_text("code\tbcp47\tiso639_3\tname\nfra\tfr\tfra\tFrench\n")
    (tmp_path / "fra.txt").write_text("Tous les êtres humains naissent libres.\n", encoding="utf-8")
    (tmp_path / "jpn.txt").write_text("すべての人間は、生まれながらにして自由である。\n", encoding="utf-8")
    result = evaluate_languages(Uniform(259, 256), ByteTokenizer(), tmp_path, seq_len=32)
    rows = {row["code"]: row for row in result["languages"]}
    assert rows["fra"]["name"] == "French" and rows["jpn"]["name"] == "jpn"
    assert rows["jpn"]["bpb"] == pytest.approx(UNIFORM_BITS) and rows["jpn"]["bpc"] == pytest.approx(3 * UNIFORM_BITS, rel=0.05)
    assert "French (fra)" in languages_markdown(result)
    with pytest.raises(DataError, match="missing: no such file or folder"):
        evaluate_languages(Uniform(259, 256), ByteTokenizer(), tmp_path / "missing", seq_len=32)


def test_saved_records_read_back_by_name(tmp_path):
    for run, bpb in (("a", 2.5), ("b", 2.0)):
        save_evaluation(tmp_path / run, "heldout", "ckpt", {"bpb": bpb}, {"bpb": bpb}, "| bpb |")
    save_evaluation(tmp_path / "b", "task-winowhy", "ckpt", {"acc": 0.5}, {}, "")
    assert json.loads((tmp_path / "a" / "evals" / "heldout.json").read_text())["headline"] == {"bpb": 2.5}
    assert (tmp_path / "a" / "evals" / "heldout.md").read_text().startswith("# heldout")
    assert set(load_evaluations(tmp_path / "b")) == {"heldout", "task-winowhy"}
    assert load_evaluations(tmp_path / "c") == {}


def test_eval_cli_saves_every_evaluation_and_compares_runs(tmp_path):
    runs = [train_tiny(family, tmp_path / family) for family in ("transformer", "aunet2")]
    udhr = dataset_path("udhr")
    languages = tmp_path / "udhr"
    languages.mkdir()
    for code in ("eng", "cmn_hans"):
        head = (udhr / f"{code}.txt").read_bytes()[:1500]
        (languages / f"{code}.txt").write_bytes(head.decode("utf-8", "ignore").encode())  # whole characters
    (languages / "index.tsv").write_bytes((udhr / "index.tsv").read_bytes())
    long = tmp_path / "long.txt"
    long.write_bytes(corpus_path("sotu").read_bytes()[:3000])
    for run in runs:
        report = json.loads(strata("eval", run, "--data", long, "--long", long, "--length", 256, "--windows", 4,
                                   "--languages", languages, "--json").stdout)
        assert report["bytes"] == 3000 and report["bpc"] > 0
        assert report["long_context"]["length"] == 256 and report["long_context"]["train_length"] == 64
        assert [row["name"] for row in report["languages"]["languages"]] == ["Chinese, Mandarin (Simplified)", "English"]
        for name in ("heldout", "long_context", "languages"):
            assert (run / "evals" / f"{name}.json").exists() and (run / "evals" / f"{name}.md").exists()
        assert_png(run / "evals" / "loss_by_position.png")
        assert_png(run / "evals" / "languages.png")
    # --compare is strata report of the runs: one table-and-plot path for both commands.
    table = strata("eval", "--compare", *runs, "--out", tmp_path / "cmp").stdout.decode()
    assert table.startswith("2 runs") and "aunet2" in table and "transformer" in table
    for name in ("headlines.png", "loss_by_position.png", "languages.png"):
        assert_png(tmp_path / "cmp" / name)
    markdown = (tmp_path / "cmp" / "report.md").read_text()
    assert "| run |" in markdown and "heldout bpb" in markdown and "languages mean_bpc" in markdown
    assert (tmp_path / "cmp" / "report.md").read_text() == (
        strata("report", *runs, "--out", tmp_path / "report") and (tmp_path / "report" / "report.md").read_text())
    compared = json.loads(strata("eval", "--compare", *runs, "--json").stdout)
    assert set(compared) == {"transformer", "aunet2"} and "languages/mean_bpc" in compared["aunet2"]
    shown = strata("eval", runs[0], "--data", long, "--needle", long, "--passkey", "--lengths", 320, "--depths", 0, 1,
                   "--trials", 1, "--characters", long, "--character-items", 2, "--character-shots", 1).stdout.decode()
    assert "bits/char" in shown and "needle: accuracy by depth" in shown and "saved in" in shown
    assert "character tasks, 1-shot" in shown and "swap_char" in shown
    characters = json.loads((runs[0] / "evals" / "characters.json").read_text())
    assert set(characters["result"]["tasks"]) == set(TASKS) and characters["result"]["tasks"]["spell"]["n"] == 2
    assert "| **average** |" in (runs[0] / "evals" / "characters.md").read_text()
    for name in ("needle", "passkey"):
        record = json.loads((runs[0] / "evals" / f"{name}.json").read_text())
        assert record["result"]["lengths"] == [320] and 0 <= record["headline"]["accuracy"] <= 1
        assert_png(runs[0] / "evals" / f"{name}.png")
    # The paper's protocols: its needle lengths up to --max-length, 20 answer tokens; one window of
    # 3x the training length (64) per document, in a 1,024-token bucket.
    paper = json.loads(strata("eval", runs[0], "--long", long, "--needle", long, "--protocol", "paper", "--max-length",
                              2000, "--depths", 0, 1, "--trials", 1, "--json").stdout)
    assert (paper["needle"]["protocol"], paper["needle"]["lengths"], paper["needle"]["depths"]) == ("paper", [960, 1984],
                                                                                                     [0.0, 1.0])
    assert paper["long_context"]["protocol"] == "paper" and paper["long_context"]["windows"] == 1
    assert [(b["start"], b["end"]) for b in paper["long_context"]["buckets"]] == [(0, 192)]

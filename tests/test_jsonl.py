"""JSON Lines files. ``metrics.jsonl``: a record counts once its newline is on disk, so a run
killed mid-write resumes and reports; any other bad line is an error naming file and line."""

import json

import pytest

from strata.data.errors import DataError
from strata.data.jsonl import json_objects
from strata.train.metrics import METRICS, MetricsLog, read_metrics


def write_lines(run_dir, records, torn: str = ""):
    (run_dir / METRICS).write_text("".join(json.dumps(record) + "\n" for record in records) + torn)


def test_a_torn_last_line_is_left_out(tmp_path):
    records = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}]
    write_lines(tmp_path, records, torn='{"step": 3, "lo')
    assert read_metrics(tmp_path) == records


def test_resume_drops_later_steps_and_a_torn_line_then_appends(tmp_path):
    write_lines(tmp_path, [{"step": 1}, {"step": 2}, {"step": 3}], torn='{"st')
    log = MetricsLog(tmp_path, truncate_after=2)
    log.write({"step": 3, "loss": 1.0})
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}, {"step": 3, "loss": 1.0}]
    assert not (tmp_path / (METRICS + ".tmp")).exists()


def test_no_file_is_no_records(tmp_path):
    assert read_metrics(tmp_path) == []


@pytest.mark.parametrize(("text", "message"), [
    ('{"step": 1}\n{"step": 2\n{"step": 3}\n', ":2: not valid JSON"),
    ('{"step": 1}\n[2]\n', ":2: expected a JSON object, found list"),
])
def test_a_bad_complete_line_names_file_and_line(tmp_path, text, message):
    (tmp_path / METRICS).write_text(text)
    with pytest.raises(DataError, match=f"{METRICS}{message}"):
        read_metrics(tmp_path)


def test_json_lines_end_at_newline_only(tmp_path):
    """U+0085 and U+2028 may stand unescaped inside a JSON string; they do not end a line."""
    path = tmp_path / "rows.jsonl"
    text = '{"text": "a\u0085b\u2028c"}\r\n\n{"text": "d"}'
    assert [record for _, record in json_objects(path, text)] == [{"text": "a\u0085b\u2028c"}, {"text": "d"}]

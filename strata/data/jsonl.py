"""JSON Lines: one object per line, each bad line named by file and line number."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from strata.data.errors import DataError


def json_objects(path: Path, text: str) -> Iterator[tuple[str, dict]]:
    """(``"file:line"``, object) for every non-blank line of ``text``, read from ``path``."""
    # Lines end at "\n" only (JSON Lines): str.splitlines would also cut at U+0085 or U+2028,
    # which a JSON string may hold unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
        yield where, record

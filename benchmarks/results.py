"""Where a benchmark's figures go besides the terminal: JSON Lines appended to ``--json``, one
object a result, so runs on several machines or days can be gathered into one file."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def append_json_lines(path: Path | None, rows: Iterable[dict]) -> None:
    """Append each row as one line to ``path``; nothing when no ``--json`` was given."""
    if path is None:
        return
    with path.open("a") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")

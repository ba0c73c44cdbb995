"""Where evaluations go: ``RUN/evals/<name>.json`` and ``<name>.md`` (and plots beside them). The
table and plots across runs (``strata report``, ``strata eval --compare``) read them back
through ``strata.experiments.report``.

Each JSON file is ``{"evaluation", "checkpoint", "headline": {metric: number}, "result": {...}}``:
``headline`` holds the few numbers a comparison table shows (bits per byte, accuracies, ...),
``result`` everything the evaluation measured. Files are written whole under a temporary name and
renamed, so a comparison never reads half a result.
"""

from __future__ import annotations

import json
from pathlib import Path

from strata.files import write_atomically

EVALS = "evals"


def evals_dir(run_dir: Path) -> Path:
    folder = Path(run_dir) / EVALS
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_evaluation(run_dir: Path, name: str, checkpoint: str, headline: dict[str, float], result: dict,
                    markdown: str) -> Path:
    """Write ``name.json`` and ``name.md`` into ``RUN/evals/``; return the JSON path."""
    folder = evals_dir(run_dir)
    record = {"evaluation": name, "checkpoint": checkpoint, "headline": headline, "result": result}
    write_atomically(folder / f"{name}.json", json.dumps(record, indent=1) + "\n")
    write_atomically(folder / f"{name}.md", f"# {name}\n\n{checkpoint}\n\n{markdown}\n")
    return folder / f"{name}.json"


def load_evaluations(run_dir: Path) -> dict[str, dict]:
    """Every evaluation record saved in ``RUN/evals/``, by name."""
    folder = Path(run_dir) / EVALS
    records = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            records[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: unreadable evaluation record ({error})") from None
    return records

"""Every name strata can fetch or build: the corpora and folders of ``registry`` and the tasks of
``tasks``, in one namespace. A config or command-line field that takes data takes a path or one
of these names (a path that exists wins; a name has no path separator)."""

from __future__ import annotations

import os
from pathlib import Path

from strata.data.errors import DataError
from strata.data.registry import DATA_SETS, cache_root, data_set, dataset_path, local_copy
from strata.data.tasks import TASKS, task_path, task_relative_path


def known_names() -> list[str]:
    return [*DATA_SETS, *TASKS]


def is_name(spec: str) -> bool:
    """Whether ``spec`` is meant as a name: no such path here and no path separator in it."""
    return not Path(spec).exists() and os.sep not in spec and not (os.altsep and os.altsep in spec)


def data_path(name: str) -> Path:
    """The file or folder behind ``name``, fetched or built first if need be."""
    if name in TASKS:
        return task_path(name)
    if name in DATA_SETS:
        return dataset_path(name)
    raise DataError(f"{name}: no such file, folder or named data set (known: {', '.join(known_names())})")


def resolve(spec: str | Path) -> Path:
    """A path as given, or the data behind a name (see the module text)."""
    spec = str(spec)
    if is_name(spec):
        return data_path(spec)
    if not Path(spec).exists():
        raise DataError(f"{spec}: no such file or folder")
    return Path(spec)


def where(name: str) -> str:
    """Where ``name`` would be read from now: ``local copy``, ``cached`` or ``-`` (not yet)."""
    relative = task_relative_path(name) if name in TASKS else data_set(name).relative_path
    if local_copy(relative):
        return "local copy"
    return "cached" if (cache_root() / relative).exists() else "-"


def catalog_rows() -> list[dict]:
    """One row per name: kind, size, licence, source, and whether it is here already."""
    rows = [{"name": name, "kind": found.kind, "size": found.size, "licence": found.licence,
             "source": str(found.package), "here": where(name), "description": found.description}
            for name, found in DATA_SETS.items()]
    rows += [{"name": name, "kind": "task", "size": f"{recipe.items:,} items", "licence": DATA_SETS[recipe.source].licence,
              "source": f"built from {recipe.source}", "here": where(name), "description": recipe.description}
             for name, recipe in TASKS.items()]
    return rows

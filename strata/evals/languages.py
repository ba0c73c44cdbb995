"""Bits per byte and per character in each language of a parallel corpus (the UDHR: ``udhr``).

The same text in every language, so differences come from the model and the script: a script of
3-byte characters (Chinese, Thai) has a low bits-per-byte and a high bits-per-character for the
same information. Both are reported; bits per character is the fairer cross-script comparison.
Language names come from the folder's ``index.tsv`` (code, bcp47, iso639_3, name, ...) when present.
"""

from __future__ import annotations

import csv
from pathlib import Path

from strata.data.catalog import resolve
from strata.data.documents import Document, load_documents
from strata.data.errors import DataError
from strata.inference.bpb import bits_per_byte


def language_names(folder: Path) -> dict[str, str]:
    index = folder / "index.tsv"
    if not index.is_file():
        return {}
    with index.open(encoding="utf-8") as file:
        return {row["code"]: row["name"] for row in csv.DictReader(file, delimiter="\t") if row.get("code")}


def evaluate_languages(model, tokenizer, folder, seq_len: int, batch_size: int = 8,
                       codes: list[str] | None = None) -> dict:
    """Bits per byte and per character of every ``*.txt`` in ``folder`` (one language a file; a
    named folder such as ``udhr`` is fetched first), or of the files ``codes`` name."""
    folder = resolve(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder of per-language texts")
    files = sorted(folder.glob("*.txt"))
    if codes is not None:
        missing = [code for code in codes if not (folder / f"{code}.txt").is_file()]
        if missing:
            raise DataError(f"{folder}: no text for language {', '.join(missing)}")
        files = [folder / f"{code}.txt" for code in sorted(codes)]
    if not files:
        raise DataError(f"{folder}: no *.txt files (one per language)")
    names = language_names(folder)
    rows = []
    for file in files:
        document = load_documents([str(file)])[0]
        scores = bits_per_byte(model, tokenizer, [Document(file.stem, document.text)], seq_len, batch_size)
        rows.append({"code": file.stem, "name": names.get(file.stem, file.stem), "bpb": scores["bpb"],
                     "bpc": scores["bpc"], "bytes": scores["bytes"], "chars": scores["chars"]})
    return {
        "languages": rows,
        "mean_bpb": sum(row["bpb"] for row in rows) / len(rows),
        "mean_bpc": sum(row["bpc"] for row in rows) / len(rows),
    }


def languages_markdown(result: dict) -> str:
    rows = [f"| {row['name']} ({row['code']}) | {row['bpb']:.3f} | {row['bpc']:.3f} | {row['bytes'] / row['chars']:.2f} |"
            for row in sorted(result["languages"], key=lambda row: row["bpc"])]
    footer = f"| **mean** | **{result['mean_bpb']:.3f}** | **{result['mean_bpc']:.3f}** | |"
    return "\n".join(["| language | bits/byte | bits/char | bytes/char |", "|---|---|---|---|", *rows, footer])


def plot_languages(results: dict[str, dict], path) -> None:
    """Bits per character per language, one bar group per model (``results``: label -> result),
    languages ordered by the first model's score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    first = next(iter(results.values()))
    order = [row["code"] for row in sorted(first["languages"], key=lambda row: row["bpc"])]
    labels = {row["code"]: row["name"] for row in first["languages"]}
    width = 0.8 / len(results)
    figure, axes = plt.subplots(figsize=(8, 0.28 * len(order) + 1.5))
    for index, (label, result) in enumerate(results.items()):
        by_code = {row["code"]: row["bpc"] for row in result["languages"]}
        positions = np.arange(len(order)) + index * width
        axes.barh(positions, [by_code.get(code, np.nan) for code in order], height=width, label=label)
    axes.set_yticks(np.arange(len(order)) + 0.4 - width / 2, [labels[code] for code in order], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("bits per character (lower is better)")
    axes.set_title("UDHR, same text in each language")
    axes.grid(True, axis="x", alpha=0.3)
    if len(results) > 1:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

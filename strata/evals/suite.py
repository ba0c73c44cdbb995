"""``strata eval``: run the requested evaluations on one trained model, save each into the run
directory (``strata.evals.report``), and return one report for the terminal or ``--json``.

Each evaluation is a function ``(trained, request) -> (headline, result, markdown, plots)``; the
suite runs those the request names, in a fixed order, and writes ``RUN/evals/<name>.{json,md}``
plus any plots there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from strata.evals.report import evals_dir, save_evaluation


@dataclass
class EvalRequest:
    data: list[str] = field(default_factory=list)  # held-out text: bits per byte / character
    tasks: list[str] = field(default_factory=list)  # multiple-choice JSONL files or task names
    shots: int = 0
    limit: int | None = None
    long: list[str] = field(default_factory=list)  # long documents: loss by position
    length: int | None = None  # window for loss by position (default 4x the training length, the paper's 3x)
    windows: int = 32  # windows for loss by position, at most
    languages: str | None = None  # folder of per-language texts, or udhr
    language_codes: list[str] | None = None  # which of its languages (default: all)
    needle: list[str] = field(default_factory=list)  # filler text for needle-in-a-haystack (give held-out text)
    passkey: bool = False
    # How needle and loss by position run: strata's own protocol or the hybrid paper's (the
    # modules' docstrings); passkey and the rest have one protocol each.
    protocol: Literal["strata", "paper"] = "strata"
    lengths: list[int] | None = None  # context lengths in tokens for needle/passkey (default: the protocol's)
    max_length: int | None = None  # the paper's needle lengths up to this (default 16,320)
    depths: list[float] | None = None  # default: the protocol's
    trials: int | None = None  # default: the protocol's
    characters: list[str] = field(default_factory=list)  # corpus whose words make the character tasks
    character_items: int = 100  # items per character task
    character_shots: int = 3

    def __post_init__(self):
        # Names as the command line and sweep files both say them: --max-length there is max_length here.
        if self.max_length is not None and (self.protocol != "paper" or self.lengths):
            raise ValueError("max-length caps the paper's needle lengths: give it with protocol paper and without "
                             "lengths")
        if self.protocol == "paper" and not (self.needle or self.long):
            raise ValueError("protocol paper changes needle and long (loss by position); give one of them (multiple "
                             "choice always reports acc_norm per character and the paper's acc_bytes per byte)")


def run_dir_of(trained) -> Path:
    """The run directory that holds the checkpoint being evaluated."""
    checkpoint = Path(trained.checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


def training_length(trained) -> int:
    return trained.config.train.seq_len or trained.config.model.context_length


def run_suite(trained, request: EvalRequest) -> dict:
    """Run every evaluation ``request`` asks for; return {name: record} (records as saved)."""
    steps = [
        ("heldout", request.data, _heldout),
        ("long_context", request.long, _long_context),
        ("languages", request.languages, _languages),
        ("needle", request.needle, _needle),
        ("passkey", request.passkey, _passkey),
        ("characters", request.characters, _characters),
    ]
    run_dir = run_dir_of(trained)
    report = {}
    for name, wanted, evaluate in steps:
        if wanted:
            headline, result, markdown = evaluate(trained, request, evals_dir(run_dir))
            save_evaluation(run_dir, name, str(trained.checkpoint), headline, result, markdown)
            report[name] = {"headline": headline, "result": result}
    for path in request.tasks:
        name = Path(path).stem
        headline, result, markdown = _task(trained, request, path)
        save_evaluation(run_dir, f"task-{name}", str(trained.checkpoint), headline, result, markdown)
        report[f"task-{name}"] = {"headline": headline, "result": result}
    return report


def _heldout(trained, request, folder):
    from strata.data import load_documents
    from strata.inference.bpb import bits_per_byte

    result = bits_per_byte(trained.model, trained.tokenizer, load_documents(request.data), training_length(trained))
    files: dict[str, dict] = {}
    for item in result.pop("per_document"):
        entry = files.setdefault(item["name"].split(":")[0], {"nats": 0.0, "bytes": 0, "chars": 0})
        for key in ("nats", "bytes", "chars"):
            entry[key] += item[key]
    result["files"] = [
        {"file": name, "bpb": entry["nats"] / math.log(2) / entry["bytes"],
         "bpc": entry["nats"] / math.log(2) / entry["chars"], "bytes": entry["bytes"], "chars": entry["chars"]}
        for name, entry in files.items()
    ]
    rows = [f"| {f['file']} | {f['bytes']:,} | {f['bpb']:.4f} | {f['bpc']:.4f} |" for f in result["files"]]
    markdown = "\n".join(["| file | bytes | bits/byte | bits/char |", "|---|---|---|---|", *rows,
                          f"| **overall** | {result['bytes']:,} | **{result['bpb']:.4f}** | **{result['bpc']:.4f}** |"])
    return {"bpb": result["bpb"], "bpc": result["bpc"]}, result, markdown


def _long_context(trained, request, folder):
    from strata.data import load_documents
    from strata.evals.long_context import (
        DEFAULT_REACH,
        loss_by_position,
        loss_by_position_markdown,
        plot_loss_by_position,
    )

    trained_length = training_length(trained)
    length = request.length or DEFAULT_REACH[request.protocol] * trained_length
    result = loss_by_position(trained.model, trained.tokenizer, load_documents(request.long), length,
                              max_windows=request.windows, protocol=request.protocol)
    result["train_length"] = trained_length
    plot = folder / "loss_by_position.png"
    plot_loss_by_position({run_dir_of(trained).name: result}, plot, {run_dir_of(trained).name: trained_length})
    result["plot"] = str(plot)
    beyond = [b for b in result["buckets"] if b["start"] >= trained_length]
    within = [b for b in result["buckets"] if b["end"] <= trained_length]
    headline = {"bpb": result["bpb"], "nats_per_token": result["nats_per_token"]}
    if within and beyond:
        headline["bpb_last_within"] = within[-1]["bpb"]
        headline["bpb_last_beyond"] = beyond[-1]["bpb"]
    return headline, result, loss_by_position_markdown(result) + f"\n\n![loss by position]({plot.name})"


def _languages(trained, request, folder):
    from strata.evals.languages import (
        evaluate_languages,
        languages_markdown,
        plot_languages,
    )

    result = evaluate_languages(trained.model, trained.tokenizer, request.languages, training_length(trained),
                                codes=request.language_codes)
    plot = folder / "languages.png"
    plot_languages({run_dir_of(trained).name: result}, plot)
    result["plot"] = str(plot)
    return ({"mean_bpb": result["mean_bpb"], "mean_bpc": result["mean_bpc"]}, result,
            languages_markdown(result) + f"\n\n![bits per character by language]({plot.name})")


def retrieval_grid(trained, request, protocol) -> tuple[list[int], list[float], int]:
    """Needle/passkey lengths, depths and trials: those asked for, else ``protocol``'s. Its lengths
    are the paper's fixed series, or strata's half to four times the training length (at least
    320 tokens: a byte-level passkey prompt alone takes about 260)."""
    from strata.evals.needle import paper_lengths

    if request.lengths:
        lengths = request.lengths
    elif protocol.name == "paper":
        lengths = paper_lengths(request.max_length)
    else:
        trained_length = training_length(trained)
        lengths = sorted({max(320, length) for length in (trained_length // 2, trained_length, 2 * trained_length,
                                                          4 * trained_length)})
    return lengths, request.depths or list(protocol.depths), request.trials or protocol.trials


def _needle(trained, request, folder):
    from strata.data import load_documents
    from strata.evals.needle import PROTOCOLS, needle_grid

    result = needle_grid(trained.model, trained.tokenizer, load_documents(request.needle),
                         *retrieval_grid(trained, request, PROTOCOLS[request.protocol]), name=run_dir_of(trained).name,
                         protocol=request.protocol)
    return _heatmap(result, folder, "needle")


def _passkey(trained, request, folder):
    from strata.evals.needle import PASSKEY_PROTOCOL, passkey_grid

    result = passkey_grid(trained.model, trained.tokenizer, *retrieval_grid(trained, request, PASSKEY_PROTOCOL),
                          name=run_dir_of(trained).name)
    return _heatmap(result, folder, "passkey")


def _heatmap(result, folder, name):
    from strata.evals.needle import needle_markdown, plot_heatmap

    plot = plot_heatmap(result, folder / f"{name}.png")
    result["plot"] = str(plot)
    return {"accuracy": result["mean"]}, result, needle_markdown(result) + f"\n\n![{name} heat map]({plot.name})"


def _characters(trained, request, folder):
    from strata.data import load_documents
    from strata.evals.characters import characters_markdown, evaluate_characters

    corpus = b"\n".join(document.text for document in load_documents(request.characters))
    result = evaluate_characters(trained.model, trained.tokenizer, corpus, n=request.character_items,
                                 shots=request.character_shots)
    return {"acc": result["average"]["acc"]}, result, characters_markdown(result)


def _task(trained, request, path):
    from strata.evals.multiple_choice import evaluate_task

    result = evaluate_task(trained.model, trained.tokenizer, path, shots=request.shots, limit=request.limit)
    metrics = ("acc", "acc_norm", "acc_bytes")
    row = " | ".join([f"{result['n']:,}", *(f"{result[m]:.4f} ± {result[f'{m}_stderr']:.4f}" for m in metrics),
                      str(request.shots)])
    header = "| n | acc | acc_norm (per character) | acc_bytes (per byte) | shots |\n|---|---|---|---|---|"
    markdown = f"{header}\n| {row} |"
    return {metric: result[metric] for metric in metrics}, result, markdown

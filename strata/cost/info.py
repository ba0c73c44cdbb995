"""What ``strata info`` shows: a cost (printed whole with ``--json``), summary rows and a table.

A language model gets one row per block (``model_cost``); an AU-Net one row per stage
(``aunet_cost``), with the bytes per stage position measured on a text when one is given.
"""

from __future__ import annotations

import itertools

from rich import box
from rich.table import Table

from strata.config import Config, ModelConfig
from strata.cost.aunet import AUNetCost, aunet_cost, measure_contraction
from strata.cost.model import ModelCost, model_cost
from strata.data import load_documents
from strata.data.splitter import Splitter
from strata.layout import BLOCK_SYMBOLS

Rows = list[tuple[str, str]]


def human(number: float, unit: str = "") -> str:
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(number) >= threshold:
            return f"{number / threshold:.3g}{suffix}{unit}"
    return f"{number:.3g}{unit}"


def mib(size: int) -> str:
    return f"{size / 2**20:,.2f} MiB"


def runs(layout: str) -> str:
    """A layout, with runs of 3 or more symbols shortened when it is long: ``A×25``, ``M×3 A M×3 A M×5``."""
    if len(layout) <= 12:
        return layout
    groups = [(symbol, len(list(group))) for symbol, group in itertools.groupby(layout)]
    return " ".join(symbol * count if count < 3 else f"{symbol}×{count}" for symbol, count in groups)


def lm_info(config: ModelConfig, context: int | None, dtype: str) -> tuple[ModelCost, Rows, Table]:
    """A language model's cost, its summary rows and its per-block table."""
    cost = model_cost(config, context, dtype)
    rows = [
        ("layout", cost.layout),
        ("parameters", f"{cost.params:,} ({human(cost.params)})"),
        ("non-embedding parameters", f"{cost.non_embedding_params:,} ({human(cost.non_embedding_params)})"),
        (f"training FLOPs / token @ {cost.context:,}", human(cost.flops_per_token)),
        ("  with the output head", human(cost.flops_per_token_with_head)),
        (f"cache @ {cost.context:,} tokens, {cost.dtype}", mib(cost.cache_bytes)),
    ]
    per_block = Table(title="per block", title_justify="left")
    for column in ("#", "block", "params", "FLOPs/token", "cache"):
        per_block.add_column(column, justify="left" if column == "block" else "right")
    for block in cost.blocks:
        per_block.add_row(
            str(block.index),
            f"{block.symbol} {BLOCK_SYMBOLS[block.symbol]}",
            f"{block.params:,}",
            human(block.flops_per_token),
            mib(block.cache_bytes),
        )
    return cost, rows, per_block


def aunet_info(config: Config, context: int | None, dtype: str, data: str | None,
               splitter: Splitter | None = None) -> tuple[AUNetCost, Rows, Table]:
    """An AU-Net's cost (the AU-Net paper's compute accounting), its summary rows and its per-stage table. ``data`` (a
    text file, folder, .jsonl or named corpus, read as training reads it) gives the contraction. The
    entropy rule measures with ``splitter`` (its byte model's, which the caller opens); without one
    its contraction stays the assumed one."""
    contraction, source = None, "given"
    if data is not None:
        documents = load_documents([data], config.data.text_field)
        if config.model.split.rule != "entropy" or splitter is not None:
            contraction = measure_contraction(config.model, (document.text for document in documents), splitter)
            source = f"measured on {data}"
    cost = aunet_cost(config.model, context, dtype, contraction, source)
    rows = [
        ("AU-Net stages", " ; ".join(runs(stage.layout) for stage in cost.stages) + f", {cost.upsample} upsampling"),
        ("parameters", f"{cost.params:,} ({human(cost.params)})"),
        ("non-embedding parameters", f"{cost.non_embedding_params:,} ({human(cost.non_embedding_params)})"),
        ("bytes per stage position", " / ".join(f"{k:.3g}" for k in cost.contraction)),
        ("", cost.contraction_source),
        (f"training FLOPs / byte @ {cost.context:,}", human(cost.flops_per_byte)),
        ("  with the output head", human(cost.flops_per_byte_with_head)),
        (f"cache @ {cost.context:,} bytes, {cost.dtype}", mib(cost.cache_bytes)),
    ]
    per_stage = Table(
        title="per stage (pool+up: the transitions into and out of it)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
        show_edge=False,
    )
    columns = ("stage", "width", "layout", "blocks", "params", "pool+up", "bytes/pos", "positions", "max len",
               "FLOPs/byte", "share", "cache MiB")  # fmt: skip
    for column in columns:
        per_stage.add_column(column, justify="left" if column == "layout" else "right")
    for stage in cost.stages:
        half = stage.blocks // 2
        per_stage.add_row(
            str(stage.stage),
            str(stage.d_model),
            runs(stage.layout),
            f"{stage.blocks} trunk" if stage.role == "trunk" else f"{half}+{half}",
            human(stage.params),
            human(stage.transition_params),
            f"{stage.bytes_per_position:.3g}",
            f"{stage.positions:,.0f}",
            "-" if stage.max_length is None else f"{stage.max_length:,}",
            human(stage.flops_per_byte),
            f"{stage.flops_share:.1%}",
            f"{stage.cache_bytes / 2**20:,.2f}",
        )
    return cost, rows, per_stage

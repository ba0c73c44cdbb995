"""Cost model of AU-Net: exact parameters, training FLOPs per byte, cache bytes, with the compute
accounting of "From Bytes to Ideas: Language Modeling with Autoregressive U-Nets" (Videau et al., 2025).

Stage i runs on one position per k_i bytes, its contraction (k_1 = 1; k_i = bytes per stage-i
position, measured on data with the config's own split rule). The paper's compute convention:

    FLOPs per byte = Σ_i F_i / k_i,    F_i = 6 · (parameters run per stage-i position)
                                              + Σ_blocks mixer sequence FLOPs(L_i) / L_i,  L_i = context / k_i

Parameters run per stage-i position: stage i's blocks (encoder and decoder below the trunk, the
trunk's once; MoE blocks count the experts a position uses) and the two transitions at the
boundary above stage i-1, which act on stage-i vectors: the pool into stage i (RMSNorm and Linear
on the selected vectors) and the upsample out of stage i (RMSNorm, the shared Linear and, for
``multilinear``, all ``max_offset`` per-offset matrices, since the model computes every offset's
output for each coarse vector and then gathers; for ``repeat`` the per-offset bias, an addition,
counted the same way, < 0.01 % of the total). Stage 1 also runs the final norm. The output head's
6·d_1·vocab per byte is left out of ``flops_per_byte``, as ``ModelCost.flops_per_token`` leaves
it out, and added in ``flops_per_byte_with_head``. Static stage lengths (``max_length``) are not in
the figures: they count the real positions of the data, not the padding or the dropped splits.
The entropy rule's byte model (``strata.models.entropy``) is not counted either: it is frozen, and
its forward passes, one per window of bytes, belong to the data pipeline.
Inference caches: stage i holds ⌈context / k_i⌉ positions, in its encoder's and decoder's blocks.

The per-block formulas are those of ``strata.cost.model``; a test holds the parameter counts
equal to the built model's.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from strata.config import AUNetConfig, StageConfig
from strata.cost.model import (
    DTYPE_BYTES,
    block_params,
    mixer_cache_elements,
    mixer_sequence_flops,
)
from strata.data.levels import splitter_for
from strata.data.splitter import Splitter

# Bytes per position of stages 2, 3, 4, ... assumed for the text rules when no data is given: those
# under which the 1B presets cost what the AU-Net paper says (AU-Net-2/3/4: 1.8e9, 2.3e9, 2.8e9 FLOPs per
# byte; the paper measured its contraction on DCLM). For comparison, the word rule with its default
# groups measures 5.3 / 9.6 / 16 on sotu.txt (plain prose) and 4.1 / 6.6 / 9.4 on shakespeare.txt.
ASSUMED_CONTRACTION = (5.0, 7.6, 12.0)


@dataclass
class StageCost:
    stage: int
    role: str  # "encoder+decoder" below the trunk, "trunk" for the deepest stage
    d_model: int
    layout: str
    blocks: int
    params: int  # the blocks'
    # the pool into this stage and the upsample out of it, and the learned rule's router that
    # places the next stage's splits (it runs on this stage's positions)
    transition_params: int
    bytes_per_position: float
    positions: float  # context / bytes_per_position
    max_length: int | None
    flops_per_position: float
    flops_per_byte: float
    flops_share: float  # of the model's flops_per_byte
    cache_bytes: int  # encoder + decoder, or the trunk


@dataclass
class TransitionCost:
    """The boundary between stage ``fine`` and stage ``fine + 1``."""

    fine: int
    pool_params: int
    upsample_params: int  # the per-offset matrices or biases included
    offset_params: int
    router_params: int = 0  # the learned rule's W_q and W_k, on the fine stage's states


@dataclass
class AUNetCost:
    layout: str
    context: int
    dtype: str
    upsample: str
    contraction: list[float]
    contraction_source: str
    params: int
    non_embedding_params: int
    embedding_params: int
    head_params: int
    final_norm_params: int
    flops_per_byte: float
    flops_per_byte_with_head: float
    cache_bytes: int
    stages: list[StageCost] = field(default_factory=list)
    transitions: list[TransitionCost] = field(default_factory=list)

    @property
    def cache_mib(self) -> float:
        return self.cache_bytes / 2**20

    def to_dict(self) -> dict:
        data = {"kind": "aunet", **asdict(self)}
        data["cache_mib"] = self.cache_mib
        return data


# --- contraction ------------------------------------------------------------------------------


def measure_contraction(config: AUNetConfig, documents: Iterable[bytes], splitter: Splitter | None = None) -> list[float]:
    """k_1..k_S on ``documents``, each read as the training stream holds it: a BOS (a split at
    every stage) then the document's bytes, whose stage-i positions are those of level >= i-1.
    The learned rule places its splits by its weights, not the bytes: its targets. The entropy
    rule's splitter scores with its byte model, which this layer cannot run: give ``splitter``
    (an AU-Net's ``splitter``, or ``strata.models.entropy``'s), else ValueError."""
    if config.split.rule == "learned":
        return learned_contraction(config)
    if splitter is None and config.split.rule == "entropy":
        raise ValueError("the entropy rule's contraction is measured with its byte model: pass splitter=")
    splitter = splitter_for(config) if splitter is None else splitter
    counts = np.zeros(config.n_stages, dtype=np.int64)  # bytes per level
    for text in documents:
        counts += np.bincount(splitter.levels(text), minlength=config.n_stages)
        counts[-1] += 1  # its BOS
    return _contraction(counts)


def contraction_of_levels(levels: np.ndarray, n_stages: int) -> list[float]:
    """k_1..k_S of a token stream from its levels (``strata.data.levels.stream_levels``, which
    gives each BOS the top level): what a trainer that has the levels already can use."""
    return _contraction(np.bincount(np.asarray(levels), minlength=n_stages))


def _contraction(counts: np.ndarray) -> list[float]:
    positions = np.cumsum(counts[::-1])[::-1]  # stage i: the bytes of level >= i-1
    if positions[0] == 0:
        raise ValueError("cannot measure the contraction of no documents")
    return [float(positions[0] / count) for count in positions]


def learned_contraction(config: AUNetConfig) -> list[float]:
    """The learned rule's k_1..k_S: the bytes per position its ratio loss aims at."""
    return [1.0, *config.learned_compression()]


def default_contraction(config: AUNetConfig, context: int) -> tuple[list[float], str]:
    """Contraction without data: exact for the stride rule (it ignores the bytes), the learned
    rule's targets, else assumed (the entropy rule's too: its splits depend on its byte model's
    weights as much as on the bytes)."""
    if config.split.rule == "learned":
        return learned_contraction(config), "the learned rule's targets (its ratio loss aims at them)"
    if config.split.rule == "stride":
        return measure_contraction(config, [bytes(context - 1)]), f"exact for the stride rule at {context:,} bytes"
    if config.n_stages - 1 > len(ASSUMED_CONTRACTION):
        raise ValueError(f"no assumed contraction for {config.n_stages} stages; give one or measure it on data (--data)")
    assumed = [1.0, *ASSUMED_CONTRACTION[: config.n_stages - 1]]
    if config.split.rule == "entropy":
        return assumed, ("assumed (the text rules' figure): the entropy rule's splits depend on its trained byte "
                         f"model ({config.split.model}); measure them with --data once it is trained")
    return assumed, "assumed: reproduces the AU-Net paper's FLOPs/byte; measure yours with --data"


def _check_contraction(contraction: list[float], n_stages: int) -> None:
    if len(contraction) != n_stages:
        raise ValueError(f"contraction needs {n_stages} values (bytes per position of each stage), got {len(contraction)}")
    if contraction[0] != 1:
        raise ValueError(f"contraction of stage 1 must be 1 (it reads every byte), got {contraction[0]}")
    if any(later < earlier for earlier, later in itertools.pairwise(contraction)):
        raise ValueError(f"contraction must not decrease with depth, got {contraction}")


# --- parameters -------------------------------------------------------------------------------


def pool_params(fine: StageConfig, coarse: StageConfig) -> int:
    return fine.d_model + fine.d_model * coarse.d_model


def upsample_params(fine: StageConfig, coarse: StageConfig, config: AUNetConfig) -> tuple[int, int]:
    """(all of the upsample's parameters, those of its per-offset matrices or biases)."""
    offsets = {"multilinear": coarse.d_model, "repeat": 1, "simple": 0}[config.upsample] * config.max_offset * fine.d_model
    return coarse.d_model + coarse.d_model * fine.d_model + offsets, offsets


# --- whole model ------------------------------------------------------------------------------


def aunet_cost(
    config: AUNetConfig,
    context: int | None = None,
    dtype: str = "bf16",
    contraction: list[float] | None = None,
    contraction_source: str = "given",
) -> AUNetCost:
    """Every figure ``strata info`` prints for an AU-Net, per stage and in total, without weights.

    ``contraction``: bytes per position of each stage (``measure_contraction``); without it, the
    stride rule's exact one or an assumed one (``default_contraction``), as ``contraction_source``
    of the result says.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    context = config.context_length if context is None else context
    if context < 1:
        raise ValueError(f"context must be a positive number of bytes, got {context}")
    if contraction is None:
        contraction, contraction_source = default_contraction(config, context)
    _check_contraction(contraction, config.n_stages)
    stages = config.stages
    transitions = []
    for index, (fine, coarse) in enumerate(itertools.pairwise(stages), start=1):
        up, offsets = upsample_params(fine, coarse, config)
        router = 2 * fine.d_model**2 if config.split.rule == "learned" else 0
        transitions.append(TransitionCost(index, pool_params(fine, coarse), up, offsets, router))
    d_1 = config.d_model
    rows = []
    for index, (stage, k) in enumerate(zip(stages, contraction), start=1):
        copies = 1 if index == config.n_stages else 2
        length = context / k
        params = copies * sum(block_params(symbol, stage) for symbol in stage.layout)
        active = copies * sum(block_params(symbol, stage, active=True) for symbol in stage.layout)
        sequence = copies * sum(mixer_sequence_flops(symbol, stage, length) for symbol in stage.layout) / length
        cache = copies * sum(mixer_cache_elements(symbol, stage, math.ceil(length)) for symbol in stage.layout)
        into = transitions[index - 2] if index > 1 else None
        out_of = transitions[index - 1] if index < config.n_stages else None
        transition = (into.pool_params + into.upsample_params if into else 0) + (out_of.router_params if out_of else 0)
        flops = 6 * (active + transition + (d_1 if index == 1 else 0)) + sequence
        rows.append(
            StageCost(
                stage=index,
                role="trunk" if copies == 1 else "encoder+decoder",
                d_model=stage.d_model,
                layout=stage.layout,
                blocks=copies * stage.n_layers,
                params=params,
                transition_params=transition,
                bytes_per_position=k,
                positions=length,
                max_length=stage.max_length,
                flops_per_position=flops,
                flops_per_byte=flops / k,
                flops_share=0.0,  # known once every stage is
                cache_bytes=DTYPE_BYTES[dtype] * cache,
            )
        )
    flops_per_byte = sum(row.flops_per_byte for row in rows)
    for row in rows:
        row.flops_share = row.flops_per_byte / flops_per_byte
    embedding = head = config.vocab_size * d_1
    non_embedding = sum(row.params + row.transition_params for row in rows) + d_1
    return AUNetCost(
        layout=config.layout,
        context=context,
        dtype=dtype,
        upsample=config.upsample,
        contraction=list(contraction),
        contraction_source=contraction_source,
        params=non_embedding + embedding + head,
        non_embedding_params=non_embedding,
        embedding_params=embedding,
        head_params=head,
        final_norm_params=d_1,
        flops_per_byte=flops_per_byte,
        flops_per_byte_with_head=flops_per_byte + 6 * d_1 * config.vocab_size,
        cache_bytes=sum(row.cache_bytes for row in rows),
        stages=rows,
        transitions=transitions,
    )

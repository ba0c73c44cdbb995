"""The autoregressive U-Net: its stages and where it splits (``SplitConfig``)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from strata.config.base import ConfigError, Strict, _KeyedError
from strata.config.model import ModelConfig, StageConfig


class SplitConfig(Strict):
    """Where AU-Net pools: a rule that gives every byte a level (``strata.data.splitter``), or
    ``learned``: H-Net's dynamic chunking, a router per stage that places the boundaries from the
    encoder's states (``strata.models.chunking``), its compression held near each stage's
    ``split_every`` bytes per position by a ratio loss of weight ``ratio_loss_weight``, or
    ``entropy``: BLT's entropy patching, splits after the bytes where a small byte-level language
    model finds the next byte hard to predict (``strata.data.splitter.EntropySplitter``,
    ``strata.models.entropy``).

    The entropy rule's keys: ``model``, the byte model (a strata run directory or checkpoint of a
    ``data.tokenizer: bytes`` language model; its trained weights are copied into a new AU-Net
    run, whose checkpoints then carry them); ``thresholds``, bits, one per level 1..S-1,
    increasing: byte i gets the deepest level whose threshold its entropy H_i exceeds, H_i being
    the entropy of the model's distribution of the token after byte i; ``margin`` (bits, BLT's
    relative rule): level 1 at least where H_i - H_(i-1) exceeds it; ``window``: the model reads
    the bytes in windows of this many from each document's start, BOS first (default 128).
    ``byte_model``: the byte model's architecture (its run's ``model`` section), read from
    ``model`` when unset; ``strata train`` writes it into the run's config, so a trained AU-Net
    opens without the byte model's run."""

    rule: Literal["word", "pretokenizer", "stride", "learned", "entropy"] = "word"
    ratio_loss_weight: float = Field(0.03, ge=0)
    model: str | None = Field(None, min_length=1)
    thresholds: list[float] | None = Field(None, min_length=1)
    margin: float | None = Field(None, ge=0)
    window: int | None = Field(None, gt=0)
    byte_model: ModelConfig | None = None

    @model_validator(mode="after")
    def _entropy_keys(self):
        keys = ("model", "thresholds", "margin", "window", "byte_model")
        if self.rule != "entropy":
            for key in keys:
                if getattr(self, key) is not None:
                    raise _KeyedError(key, f"applies to the entropy rule; rule is {self.rule}")
            return self
        if self.model is None:
            raise _KeyedError("model", "required for the entropy rule: the byte model's run directory or checkpoint")
        if self.thresholds is None:
            raise _KeyedError("thresholds", "required for the entropy rule: bits, one per level 1..S-1")
        if any(not math.isfinite(value) or value < 0 for value in self.thresholds):
            raise _KeyedError("thresholds", f"must be finite numbers of bits >= 0; got {self.thresholds}")
        if any(deep <= shallow for shallow, deep in itertools.pairwise(self.thresholds)):
            raise _KeyedError("thresholds", f"must increase from level to level, since deeper stages split "
                                            f"less often; got {self.thresholds}")
        if self.window is None:
            self.window = 128
        if self.byte_model is not None:
            _check_byte_model(self.byte_model, self.window)
        return self

    def entropy_model_config(self) -> ModelConfig:
        """The byte model's architecture: ``byte_model``, else read from the run at ``model``
        (its config.yaml, which must describe a bytes language model). ConfigError names the key."""
        if self.rule != "entropy":
            raise ValueError(f"the {self.rule} rule has no entropy model")
        if self.byte_model is not None:
            return self.byte_model
        path = Path(self.model).expanduser()
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"model.split.model: {self.model} holds no strata run (config.yaml); train the byte "
                              f"model first (strata train configs/tiny/byte-entropy.yaml --out {self.model}) or "
                              "give model.split.byte_model")
        from strata.config.loading import (
            load_config,  # loading reads whole configs, AU-Nets' among them
        )

        config = load_config(run_dir / "config.yaml")
        if not isinstance(config.model, ModelConfig) or config.data.tokenizer != "bytes":
            raise ConfigError(f"model.split.model: {self.model} is not a byte-level language model (kind lm, "
                              "data.tokenizer: bytes)")
        try:
            _check_byte_model(config.model, self.window)
        except _KeyedError as error:
            raise ConfigError(f"model.split.{error.key}: {error.message} ({self.model})") from None
        return config.model


def _check_byte_model(model: ModelConfig, window: int) -> None:
    if model.vocab_size < 257:
        raise _KeyedError("byte_model.vocab_size", f"{model.vocab_size} cannot hold the bytes and BOS (id 256)")
    if window + 1 > model.context_length:
        raise _KeyedError("window", f"the byte model reads BOS and {window} bytes, beyond its context_length "
                                    f"{model.context_length}")


class AUNetConfig(Strict):
    """The autoregressive U-Net over bytes of "From Bytes to Ideas: Language Modeling with
    Autoregressive U-Nets" (Videau et al., 2025): stages from bytes to the trunk.

    ``upsample``: how a coarse vector is spread over the finer positions of its segment:
    ``multilinear`` (a shared Linear plus one Linear per offset, offsets modulo ``max_offset``),
    ``repeat`` (one Linear plus a learned bias per offset) or ``simple`` (one Linear, placed only
    at the segment's first position).
    """

    kind: Literal["aunet"]
    vocab_size: int = Field(gt=0)
    context_length: int = Field(8192, gt=0)
    init_std: float = Field(0.02, gt=0)
    split: SplitConfig = SplitConfig()
    upsample: Literal["multilinear", "repeat", "simple"] = "multilinear"
    max_offset: int = Field(16, gt=0)
    stages: list[StageConfig] = Field(min_length=2)

    @model_validator(mode="after")
    def _stages(self):
        if self.stages[0].split_every is not None:
            raise _KeyedError("stages.0.split_every", "stage 1 reads every byte; split_every applies to deeper stages")
        given = [stage.split_every for stage in self.stages[1:]]
        if self.split.rule == "learned" and given[0] is not None and given[0] < 2:
            raise _KeyedError("stages.1.split_every", "the learned rule needs a target of 2 or more bytes per position")
        if any(every is not None for every in given) and None in given:
            index = given.index(None) + 1
            raise _KeyedError(f"stages.{index}.split_every", "give split_every for every stage after the first, or for none")
        if None not in given:
            for index in range(2, len(given) + 1):
                if given[index - 1] <= given[index - 2]:
                    raise _KeyedError(
                        f"stages.{index}.split_every",
                        f"{given[index - 1]} must exceed the previous stage's {given[index - 2]}: deeper stages are coarser",
                    )
        if self.split.rule == "entropy":
            if None not in given:
                raise _KeyedError("stages.1.split_every", "does not apply to the entropy rule: its thresholds place the splits")
            if len(self.split.thresholds) != self.n_stages - 1:
                raise _KeyedError("split.thresholds", f"give one per level 1..{self.n_stages - 1} ({self.n_stages} stages); "
                                                      f"got {len(self.split.thresholds)}")
        for index, stage in enumerate(self.stages[:-1]):
            deeper = self.stages[index + 1].max_length
            if stage.max_length is not None and deeper is not None and deeper > stage.max_length:
                raise _KeyedError(f"stages.{index + 1}.max_length", "exceeds the previous stage's max_length")
        return self

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    @property
    def d_model(self) -> int:
        """Width of the byte stage, where the embedding and the head are."""
        return self.stages[0].d_model

    @property
    def layout(self) -> str:
        """The stages' layouts joined by ';' (encoder layouts; decoders repeat them)."""
        return ";".join(stage.layout for stage in self.stages)

    def splitter_settings(self) -> dict:
        """Keyword arguments of ``strata.data.splitter.make_splitter`` for this model (the learned
        rule's splitter marks no byte: its model places the splits; the entropy rule's needs its
        byte model's ``score`` besides)."""
        everies = [stage.split_every for stage in self.stages[1:]]
        if self.split.rule == "learned":
            return {"rule": "none", "stages": self.n_stages}
        if self.split.rule == "entropy":  # with the entropy model's score (``strata.models.entropy``)
            split = self.split
            return {"rule": "entropy", "stages": self.n_stages, "window": split.window,
                    "thresholds": list(split.thresholds), "margin": split.margin}
        key = "strides" if self.split.rule == "stride" else "groups"
        return {"rule": self.split.rule, "stages": self.n_stages, key: None if None in everies else everies}

    def learned_compression(self) -> list[float]:
        """The learned rule's targets: bytes per position of stages 2..S (``split_every``, by
        default 4, 8, 16, ...)."""
        everies = [stage.split_every for stage in self.stages[1:]]
        return [float(every) for every in everies] if None not in everies else [4.0 * 2**k for k in range(len(everies))]

"""A whole configuration file: the model (either kind), the data and the training."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from strata.config.aunet import AUNetConfig
from strata.config.base import Strict, _KeyedError
from strata.config.model import ModelConfig


def _model_kind(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("kind", "lm")
    return getattr(value, "kind", "lm")


AnyModelConfig = Annotated[
    Annotated[ModelConfig, Tag("lm")] | Annotated[AUNetConfig, Tag("aunet")],
    Discriminator(_model_kind, custom_error_type="model_kind", custom_error_message="kind must be 'lm' (one stack of blocks) or 'aunet'"),
]


class HFTokenizerConfig(Strict):
    """A Hugging Face ``tokenizers`` file used as it is: ``path`` is a tokenizer.json or a folder
    holding one (relative paths from the working directory, as data sources). Frozen, so that it
    hashes and compares like the strings ``bytes`` and ``bpe``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["hf"] = "hf"
    path: str = Field(min_length=1)


class DataConfig(Strict):
    """What to train on. ``sources`` are .txt files, folders of them, .jsonl files (one JSON object a
    line, text under ``text_field``) or named corpora (``shakespeare``), fetched on first use.
    ``tokenizer``: ``bytes``, ``bpe`` (trained on the training split, ``bpe_vocab_size`` ids) or
    ``{kind: hf, path: FILE_OR_DIR}`` (strata/data/tokenizer.py). ``document_masking``: training
    rows pack documents (BOS before each) as the papers do, attending across the seams; true keeps
    each document to itself (segment ids from the BOS positions; strata eval scores documents one
    at a time, so it never crosses a seam either way)."""

    sources: list[str] = Field(default_factory=lambda: ["shakespeare"])
    text_field: str = "text"
    tokenizer: Literal["bytes", "bpe"] | HFTokenizerConfig = "bytes"
    bpe_vocab_size: int = Field(4096, ge=260)
    valid_fraction: float = Field(0.05, gt=0, lt=0.5)
    document_masking: bool = False

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _tokenizer_form(cls, value):
        # Checked here rather than by the union, whose error for a bad mapping would name the
        # union's members instead of the key.
        if isinstance(value, str):
            if value not in ("bytes", "bpe"):
                raise ValueError("expected bytes, bpe or {kind: hf, path: FILE_OR_DIR}")
            return value
        if isinstance(value, dict):
            if value.get("kind", "hf") != "hf":  # kind may be left out: data.tokenizer.path=DIR
                raise _KeyedError("kind", f"expected hf (got {value['kind']!r}); bytes and bpe are plain strings")
            unknown = sorted(set(value) - {"kind", "path"})
            if unknown:
                raise _KeyedError(str(unknown[0]), "unknown key")
            if not isinstance(value.get("path"), str) or not value["path"]:
                raise _KeyedError("path", "required: a tokenizer.json or a folder holding one")
            return HFTokenizerConfig(**value)
        if isinstance(value, HFTokenizerConfig):
            return value
        raise ValueError("expected bytes, bpe or {kind: hf, path: FILE_OR_DIR}")

    @property
    def tokenizer_kind(self) -> str:
        """``bytes``, ``bpe`` or ``hf``."""
        return self.tokenizer if isinstance(self.tokenizer, str) else self.tokenizer.kind


class TrainConfig(Strict):
    """How to train. The run stops at the first of steps, tokens, flops, or time_limit (seconds).

    Under ``torchrun`` (``strata/train/distributed.py``): ``parallel`` is ``ddp`` (replicated
    weights, averaged gradients) or ``fsdp`` (FSDP2, weights and optimiser state sharded per
    block); ``auto`` is ddp with several processes and nothing with one. ``batch_size`` stays the
    global batch, split evenly among the processes. ``activation_checkpointing`` recomputes each
    block's activations in the backward pass; ``compile`` compiles each block; both apply to the
    training forward only. ``dist_timeout``: seconds a collective waits for the other processes
    before the run fails (a dead or stuck rank). ``carry_state``: truncated backpropagation through
    time: each row reads its own stretch of the stream window after window, and the model's state
    (Mamba-2's conv and SSM state, attention's keys and values: at most ``carry_context`` tokens of
    them, by default ``seq_len``) flows from one window to the next, detached. ``init_from``: a strata run or checkpoint, or a
    Hugging Face model directory, whose weights (and tokenizer) a new run starts from (fine-tuning;
    ``strata train CONFIG --init-from DIR`` sets it with the model section to match).
    """

    steps: int = Field(1000, gt=0)
    tokens: int | None = Field(None, gt=0)
    flops: float | None = Field(None, gt=0)
    time_limit: float | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    seq_len: int | None = Field(None, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup: float = Field(0.05, ge=0, lt=1)
    decay: float = Field(0.2, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    clip: float | None = Field(1.0, gt=0)
    seed: int = Field(0, ge=0)
    eval_every: int = Field(100, gt=0)
    eval_bytes: int = Field(65536, gt=0)
    save_every: int = Field(500, gt=0)
    keep_last: int = Field(3, gt=0)
    max_bad_steps: int = Field(5, gt=0)
    compile: bool = False
    activation_checkpointing: bool = False
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    dist_timeout: float = Field(600.0, gt=0)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    init_from: str | None = None
    carry_state: bool = False
    carry_context: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _schedule(self):
        if self.warmup + (self.decay if self.schedule == "wsd" else 0) > 1:
            raise _KeyedError("decay", f"warmup ({self.warmup}) + decay ({self.decay}) exceed the whole run")
        return self


class Config(Strict):
    """A whole strata configuration file."""

    description: str = ""
    model: AnyModelConfig
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _bytes_for_aunet(self):
        if isinstance(self.model, AUNetConfig) and self.data.tokenizer != "bytes":
            raise _KeyedError("data.tokenizer", "AU-Net reads bytes and pools them itself; set data.tokenizer: bytes")
        if self.train.carry_state and self.data.document_masking:
            raise _KeyedError("train.carry_state", "a carried state flows across documents; it cannot be combined "
                                                   "with data.document_masking yet")
        return self

"""Sweep files: a base config, sizes, a grid of named axes, a budget and the evaluations to run.

    description: inter- vs intra-layer hybrids at two ratios
    base:
      config: ../tiny/hybrid.yaml            # relative to this file
      set: {train.eval_every: 50}            # dotted overrides with YAML values
    sizes:                                   # chosen with --size; the first is the default
      cpu: {set: {model.layout.layers: 13}, budget: 2.0e13}
      gpu: {set: {model.d_model: 1024}, budget: 1.0e18, eval: {tasks: [...]}}  # and mqar: {...}
    grid:                                    # every combination of the axes' values is a run
      family:                                # a list of named variants ...
        - {name: inter, set: {model.layout.special: A}}
        - {name: intra, set: {model.layout.special: H}, sizes: {gpu: {model.hybrid.mamba.d_ssm: 1024}}}
      ratio: {key: model.layout.ratio, values: ["1:1", "1:5"]}   # ... or one key and its values
    also:                                    # single runs beside the grid
      - {name: mamba2, set: {model.layout.ratio: "0:1"}}
    budget: {kind: flops, value: 1.0e13}     # or params / tokens (strata.experiments.budget)
    eval: {data: [...], tasks: [...], limit: 200, decode: {new: 32}, mqar: {pairs: [4, 8, 16]}}
    mqar: {seq_len: 64, n_pairs: [4, 8, 16]} # train on MQAR instead of text (recall sweeps)

A run's config is built in this order: the config file of its variant that names one (else
``base.config``), ``base.set``, the size's ``set``, then each variant's ``set`` in axis order and
its ``sizes.<size>``. The size comes before the variants so that a size can scale a layout given
by ratio (``model.layout.layers``) that the variants then place. Overrides given to
``strata sweep`` (``data.sources=[...]``) come last. A run is named by its variants' names joined
with ``-`` (``inter-1to5``); a value's name is the value with ``:`` read as ``to``.
``eval`` holds the fields of ``strata.evals.suite.EvalRequest`` (what ``strata eval`` runs: data
by name, ``sotu``, ``udhr-language``, or by path, environment variables expanded), plus ``decode`` (decode tokens/s on this
machine; on unless set to null) and ``mqar`` (recall grid).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, ValidationError, model_validator

from strata.config import ConfigError, Strict, apply_override, read_yaml, set_key
from strata.evals.suite import EvalRequest

NAME = r"^[A-Za-z0-9_.]+$"  # no "-": it joins the variants' names into the run's
PATH_FIELDS = ("data", "tasks", "long", "languages", "needle", "characters")


class Variant(Strict):
    """One value of an axis: a name, optionally a config file of its own, and overrides."""

    name: str = Field(pattern=NAME)
    label: str | None = None  # how reports show it (default: the name)
    config: str | None = None
    set: dict[str, Any] = {}
    sizes: dict[str, dict[str, Any]] = {}


class KeyAxis(Strict):
    """An axis that sets one key: each value is a variant named after it."""

    key: str
    values: list[Any] = Field(min_length=1)

    def variants(self) -> list[Variant]:
        return [Variant(name=value_name(value), label=str(value), set={self.key: value}) for value in self.values]


# An axis is a list of variants or a key with its values; the YAML's shape says which, so that an
# error is reported against the form that was meant.
AXIS_FORMS = ("variant list", "key axis")
Axis = Annotated[
    Annotated[list[Variant], Tag(AXIS_FORMS[0])] | Annotated[KeyAxis, Tag(AXIS_FORMS[1])],
    Discriminator(lambda value: AXIS_FORMS[0] if isinstance(value, list) else AXIS_FORMS[1]),
]


class Size(Strict):
    set: dict[str, Any] = {}
    budget: float | None = Field(None, gt=0)  # replaces budget.value at this size
    eval: dict[str, Any] = {}  # replaces these fields of eval at this size
    mqar: dict[str, Any] = {}  # ... and these of mqar


class Base(Strict):
    config: str | None = None
    set: dict[str, Any] = {}


class Budget(Strict):
    """What the runs share (``strata.experiments.budget``): training FLOPs, parameters or tokens."""

    kind: Literal["flops", "params", "tokens"]
    value: float | None = Field(None, gt=0)
    head: bool = False  # flops: count the output head's FLOPs too
    tolerance: float = Field(0.02, gt=0, lt=1)  # flops: largest spread allowed between runs
    key: str = "model.d_model"  # params: the key chosen per run ...
    values: list[Any] = []  # ... among these

    @model_validator(mode="after")
    def _params_choices(self):
        if self.kind == "params" and not self.values:
            raise ValueError("a params budget needs `values`: the candidates for `key` (default model.d_model)")
        return self


class DecodeEval(Strict):
    """Decode tokens/s after a prompt of ``context`` tokens (default: the training length)."""

    context: int | None = Field(None, gt=0)
    new: int = Field(32, gt=1)
    batch: int = Field(1, gt=0)
    repeats: int = Field(3, gt=0)


class MQAREval(Strict):
    """Recall at each length and pair count (lengths default to the trained one and twice it)."""

    seq_lens: list[int] | None = None
    pairs: list[int] = [4, 8, 16, 32]
    examples: int = Field(256, gt=0)


class SweepEval(Strict):
    decode: DecodeEval | None = DecodeEval()
    mqar: MQAREval | None = None
    request: EvalRequest = EvalRequest()

    @model_validator(mode="before")
    @classmethod
    def _gather(cls, data):
        """Every key but ``decode`` and ``mqar`` is a field of the suite's EvalRequest."""
        if not isinstance(data, dict) or "request" in data:  # not a sweep file's, but a plan's (model_dump)
            return data
        own = {key: data[key] for key in ("decode", "mqar") if key in data}
        return {**own, "request": {key: value for key, value in data.items() if key not in own}}


class MQARTraining(Strict):
    seq_len: int = Field(64, gt=0)
    n_pairs: list[int] = Field([4, 8, 16], min_length=1)


class SweepSpec(Strict):
    description: str = ""
    base: Base = Base()
    sizes: dict[str, Size] = {}
    grid: dict[str, Axis] = {}
    also: list[Variant] = []
    budget: Budget | None = None
    eval: dict[str, Any] = {}  # a SweepEval once the size's fields are in (``Sweep.evaluation``)
    mqar: MQARTraining | None = None

    @model_validator(mode="after")
    def _some_runs(self):
        if not self.grid and not self.also:
            raise ValueError("no runs: give a grid of axes or runs under `also`")
        return self


def value_name(value: Any) -> str:
    """The name of a grid value in run names: ``"1:5"`` -> ``1to5``, ``"M"`` -> ``M``."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", str(value).replace(":", "to"))


def _check(model, data: Any, source: str):
    """``model.model_validate(data)``, with a pydantic error turned into one line naming the key."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"] if part not in ("request", *AXIS_FORMS))
        message = "unknown key" if first["type"] in ("extra_forbidden", "unexpected_keyword_argument") else first["msg"]
        raise ConfigError(f"{source}: {key or '<top level>'}: {message.removeprefix('Value error, ')}") from None


@dataclass
class RunSpec:
    """One run of a sweep before its budget is applied: config data, not yet validated."""

    name: str
    choices: dict[str, str]  # axis -> the variant's label
    data: dict
    source: str  # "SWEEP (run NAME)", for error messages


@dataclass
class Sweep:
    path: Path
    spec: SweepSpec

    @property
    def folder(self) -> Path:
        return self.path.parent

    def size_name(self, size: str | None) -> str | None:
        """The size asked for, or the first one listed; None for a sweep without sizes."""
        if size is None:
            return next(iter(self.spec.sizes), None)
        if size not in self.spec.sizes:
            known = ", ".join(self.spec.sizes) or "none (this sweep has no sizes)"
            raise ConfigError(f"{self.path}: sizes: no size {size!r}; known: {known}")
        return size

    def size(self, size: str | None) -> Size:
        name = self.size_name(size)
        return self.spec.sizes[name] if name is not None else Size()

    def budget(self, size: str | None) -> Budget | None:
        budget, value = self.spec.budget, self.size(size).budget
        if budget is not None and value is not None:
            budget = budget.model_copy(update={"value": value})
        if budget is not None and budget.value is None:
            raise ConfigError(f"{self.path}: budget.value: required (or a `budget` under the size)")
        return budget

    def mqar(self, size: str | None) -> MQARTraining | None:
        if self.spec.mqar is None:
            if self.size(size).mqar:
                raise ConfigError(f"{self.path}: sizes.{self.size_name(size)}.mqar: the sweep has no mqar section to change")
            return None
        return _check(MQARTraining, {**self.spec.mqar.model_dump(), **self.size(size).mqar}, f"{self.path}: mqar")

    def evaluation(self, size: str | None) -> SweepEval:
        evaluation = _check(SweepEval, {**self.spec.eval, **self.size(size).eval}, f"{self.path}: eval")
        fields = {}
        for name in PATH_FIELDS:
            value = getattr(evaluation.request, name, None)  # fields the suite may not have yet
            if isinstance(value, list):
                fields[name] = [_expand(path, name, self.path) for path in value]
            elif value:
                fields[name] = _expand(value, name, self.path)
        evaluation.request = dataclasses.replace(evaluation.request, **fields)
        return evaluation

    def runs(self, size: str | None, overrides: list[str] = ()) -> list[RunSpec]:
        """Every run of the sweep at ``size``, in grid order, then ``also``; ``overrides``
        (``key.sub=value``, from the command line) apply to every run, after everything else."""
        size = self.size_name(size)
        axes = {name: axis.variants() if isinstance(axis, KeyAxis) else axis for name, axis in self.spec.grid.items()}
        combinations = [dict(zip(axes, picked)) for picked in itertools.product(*axes.values())] if axes else []
        combinations += [{"run": variant} for variant in self.spec.also]
        runs, seen = [], set()
        for picked in combinations:
            name = "-".join(variant.name for variant in picked.values())
            if name in seen:
                raise ConfigError(f"{self.path}: two runs are named {name!r}; give their variants different names")
            seen.add(name)
            runs.append(self._run(name, picked, size, overrides))
        return runs

    def _run(self, name: str, picked: dict[str, Variant], size: str | None, overrides: list[str]) -> RunSpec:
        source = f"{self.path} (run {name})"
        files = [variant.config for variant in picked.values() if variant.config is not None]
        if len(files) > 1:
            raise ConfigError(f"{source}: two of its variants name a config file ({', '.join(files)}); at most one may")
        config_file = files[0] if files else self.spec.base.config
        if config_file is None:
            raise ConfigError(f"{self.path}: base.config: required unless every run's variant names a config file")
        data = read_yaml(self.folder / config_file)
        mappings = [self.spec.base.set, self.size(size).set]
        for variant in picked.values():
            unknown = set(variant.sizes) - set(self.spec.sizes)
            if unknown:
                raise ConfigError(f"{source}: variant {variant.name}: sizes: no size {sorted(unknown)[0]!r} in this sweep")
            mappings += [variant.set, variant.sizes.get(size, {})]
        for mapping in mappings:
            for key, value in mapping.items():
                set_key(data, key, value, source)
        for override in overrides:
            apply_override(data, override, source)
        choices = {axis: variant.label or variant.name for axis, variant in picked.items() if axis != "run"}
        return RunSpec(name, choices, data, source)


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; ConfigError names the file and the key on any problem."""
    path = Path(path)
    data = read_yaml(path)
    return Sweep(path, _check(SweepSpec, data, str(path)))


def _expand(path: str, field: str, source: Path) -> str:
    expanded = os.path.expandvars(path)
    if "$" in expanded:
        raise ConfigError(f"{source}: eval.{field}: {path!r} names an environment variable that is not set")
    return expanded


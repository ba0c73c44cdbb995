"""Matching a sweep's runs by a budget: equal training FLOPs, equal parameters or equal tokens.

- ``flops``: a run of F training FLOPs per token and T tokens per step trains round(B / (F·T))
  steps, the whole number of steps nearest the budget B. F comes from the cost model, exactly as
  the trainer computes it: for an AU-Net, FLOPs per byte with the stage contraction measured on
  the run's own training stream. F leaves out the output head by default (the papers'
  6·N_non-embedding convention, and what ``train.flops`` counts); ``head: true`` counts it, for
  comparisons across vocabularies (bytes vs BPE), where the head is a large share of a small
  model. If rounding leaves the runs more than ``tolerance`` (2 %) apart, the budget is too small
  for their step sizes, and the error names the run and the budget that would do.
- ``params``: each run takes the value of ``key`` (default ``model.d_model``) among ``values``
  whose non-embedding parameter count is nearest B; every run then trains the steps its config
  gives. Only one key moves, so the others (FFN width, heads) must fit every candidate.
- ``tokens``: each run trains round(B / T) steps.

Every run's config then says its length in ``train.steps`` alone (``tokens`` and ``flops``
cleared), so the trainer runs exactly the steps planned here.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field

from strata.config import (
    AUNetConfig,
    Config,
    ConfigError,
    config_to_dict,
    set_key,
    validate_config,
)
from strata.cost.aunet import aunet_cost, contraction_of_levels, default_contraction, learned_contraction
from strata.cost.model import model_cost
from strata.data import ByteTokenizer, check_vocab_size, planned_vocab_size
from strata.experiments.sweep_spec import Budget, MQARTraining, RunSpec


@dataclass
class RunCost:
    params: int
    non_embedding_params: int
    flops_per_token: float  # training, without the output head (per byte for an AU-Net)
    flops_per_token_with_head: float
    tokens_per_step: int
    seq_len: int
    contraction: list[float] | None = None  # AU-Net: bytes per stage position, measured


@dataclass
class PlannedRun:
    name: str
    choices: dict[str, str]
    config: Config  # train.steps set
    source: str
    cost: RunCost
    steps: int
    matched: dict = field(default_factory=dict)  # params budget: {key: value chosen}

    @property
    def tokens(self) -> int:
        return self.steps * self.cost.tokens_per_step

    @property
    def flops(self) -> float:
        return self.tokens * self.cost.flops_per_token

    @property
    def flops_with_head(self) -> float:
        return self.tokens * self.cost.flops_per_token_with_head

    def counted_flops(self, head: bool) -> float:
        """Training FLOPs as a budget counts them: with the output head or without."""
        return self.flops_with_head if head else self.flops


def plan_runs(runs: list[RunSpec], budget: Budget | None, mqar: MQARTraining | None = None) -> list[PlannedRun]:
    """Validate each run's config, cost it and set its steps by the budget; check that FLOPs
    budgets match within the tolerance and that no two runs are the same model."""
    planned = []
    for run in runs:
        data, matched = (_nearest_params(run, budget, mqar) if budget is not None and budget.kind == "params"
                         else (run.data, {}))
        config = _validated(data, run.source, mqar is None)
        if budget is not None and budget.kind != "params" and config.train.time_limit is not None:
            raise ConfigError(f"{run.source}: train.time_limit: would stop the run short of its {budget.kind} budget; remove it")
        cost = run_cost(config, mqar)
        steps = _steps(config, cost, budget)
        data = config_to_dict(config)
        data["train"].update(steps=steps, tokens=None, flops=None)
        planned.append(PlannedRun(run.name, run.choices, validate_config(data, run.source), run.source, cost, steps, matched))
    if budget is not None and budget.kind == "flops":
        _check_spread(planned, budget)
    _check_distinct(planned)
    return planned


def run_cost(config: Config, mqar: MQARTraining | None = None) -> RunCost:
    """Parameters and training FLOPs per token of a run, and its tokens per step."""
    model, train = config.model, config.train
    if mqar is not None:
        if mqar.seq_len > model.context_length:
            raise ConfigError(f"mqar.seq_len: {mqar.seq_len} exceeds the model's context_length {model.context_length}")
        seq_len, tokens_per_step = mqar.seq_len, train.batch_size * mqar.seq_len
    else:
        seq_len = train.seq_len or model.context_length
        tokens_per_step = train.batch_size * seq_len * train.grad_accum
    if isinstance(model, AUNetConfig):
        contraction = measured_contraction(config)
        cost = aunet_cost(model, seq_len, "fp32", contraction)
        return RunCost(cost.params, cost.non_embedding_params, cost.flops_per_byte, cost.flops_per_byte_with_head,
                       tokens_per_step, seq_len, contraction)
    cost = model_cost(model, seq_len, "fp32")
    return RunCost(cost.params, cost.non_embedding_params, cost.flops_per_token, cost.flops_per_token_with_head,
                   tokens_per_step, seq_len)


def measured_contraction(config: Config) -> list[float]:
    """An AU-Net's bytes per stage position on its training stream, as the trainer measures them
    (cached: the runs of a sweep often share their data and split rule); the learned rule's
    targets, which its ratio loss holds the splits near; for the entropy rule, measured with its
    byte model once that is trained, assumed before (``default_contraction``)."""
    if config.model.split.rule == "learned":
        return learned_contraction(config.model)
    data = config.data
    if config.model.split.rule == "entropy":
        model = json.dumps(config.model.model_dump(mode="json"), sort_keys=True)
        return _entropy_contraction(tuple(data.sources), data.text_field, data.valid_fraction, model)
    settings = json.dumps(config.model.splitter_settings(), sort_keys=True)
    return _contraction(tuple(data.sources), data.text_field, data.valid_fraction, settings)


@functools.lru_cache(maxsize=16)
def _contraction(sources: tuple, text_field: str, valid_fraction: float, splitter_settings: str) -> list[float]:
    from strata.data.splitter import make_splitter

    settings = json.loads(splitter_settings)
    return _stream_contraction(sources, text_field, valid_fraction, make_splitter(**settings))


def _stream_contraction(sources: tuple, text_field: str, valid_fraction: float, splitter) -> list[float]:
    """k_1..k_S of the training stream (BOS before each document) as ``splitter`` levels it."""
    from strata.data import load_documents, pack, split_documents
    from strata.data.levels import stream_levels

    train, _ = split_documents(load_documents(list(sources), text_field), valid_fraction)
    return contraction_of_levels(stream_levels(pack(train, ByteTokenizer()), splitter), splitter.stages)


@functools.lru_cache(maxsize=4)
def _entropy_contraction(sources: tuple, text_field: str, valid_fraction: float, model: str) -> list[float]:
    """The entropy rule's contraction, measured with its trained byte model (``split.model``) on
    the training stream; the assumed one (``default_contraction``) while that model has no run."""
    from strata.train.entropy import entropy_splitter

    config = AUNetConfig.model_validate(json.loads(model))
    splitter = entropy_splitter(config)
    if splitter is None:
        return default_contraction(config, config.context_length)[0]
    return _stream_contraction(sources, text_field, valid_fraction, splitter)


def _validated(data: dict, source: str, text: bool) -> Config:
    """The config; for a text run, stopped here when its vocab_size is not its tokenizer's, as the
    trainer would stop it, rather than after the sweep's first runs."""
    config = validate_config(data, source)
    if text:
        check_vocab_size(config.model.vocab_size, config.data, planned_vocab_size(config.data), source)
    return config


def _steps(config: Config, cost: RunCost, budget: Budget | None) -> int:
    if budget is None or budget.kind == "params":
        # What the trainer plans from the config: the first of steps, tokens and FLOPs reached.
        from strata.train.trainer import plan_steps

        return plan_steps(config, cost.tokens_per_step, cost.flops_per_token)
    per_token = cost.flops_per_token_with_head if budget.head else cost.flops_per_token
    per_step = cost.tokens_per_step * (per_token if budget.kind == "flops" else 1)
    return max(1, round(budget.value / per_step))


def _nearest_params(run: RunSpec, budget: Budget, mqar: MQARTraining | None) -> tuple[dict, dict]:
    """The run's data with ``budget.key`` set to the candidate nearest the parameter budget."""
    best = None
    for value in budget.values:
        data = copy.deepcopy(run.data)
        set_key(data, budget.key, value, run.source)
        try:
            params = run_cost(_validated(data, run.source, mqar is None), mqar).non_embedding_params
        except ConfigError:
            continue  # a candidate this model cannot take (heads that do not divide it)
        if best is None or abs(params - budget.value) < abs(best[0] - budget.value):
            best = (params, data, value)
    if best is None:
        raise ConfigError(f"{run.source}: budget.values: no candidate for {budget.key} gives a valid config")
    return best[1], {budget.key: best[2]}


def _check_spread(planned: list[PlannedRun], budget: Budget) -> None:
    counted = [run.counted_flops(budget.head) for run in planned]
    spread = max(counted) / min(counted) - 1
    if spread <= budget.tolerance:
        return
    worst = max(range(len(planned)), key=lambda i: abs(counted[i] / budget.value - 1))
    run = planned[worst]
    step = counted[worst] / run.steps
    # Rounding to whole steps errs by at most half a step: s/2B per run, so runs stay within the
    # tolerance t once B >= s·(2 + t) / (2t) for the largest step s.
    largest = max(value / r.steps for value, r in zip(counted, planned))
    needed = largest * (2 + budget.tolerance) / (2 * budget.tolerance)
    raise ConfigError(
        f"{run.source}: budget.value: {budget.value:.3g} FLOPs is too small to match the runs within "
        f"{budget.tolerance:.0%} (they differ by {spread:.1%}): this run's steps are {step:.3g} FLOPs each, so "
        f"{run.steps} steps spend {counted[worst]:.3g} ({counted[worst] / budget.value - 1:+.1%}); give at least {needed:.2g}"
    )


def _check_distinct(planned: list[PlannedRun]) -> None:
    """Two runs with one config are a grid mistake (a placement that collapses at this depth)."""
    seen: dict[str, str] = {}
    for run in planned:
        data = config_to_dict(run.config)
        data.pop("description", None)
        key = repr(data)
        if key in seen:
            raise ConfigError(f"{run.source}: the same config as run {seen[key]} (layout {run.config.model.layout}); "
                              "change the grid or the size so that every run differs")
        seen[key] = run.name

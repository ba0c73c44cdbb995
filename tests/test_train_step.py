"""The one optimiser step both training loops take (``strata.train.step``): accumulation equals
one large batch, a non-finite step changes nothing and enough of them stop the run, and the MQAR
trainer gets what the trainer has (clipping from its settings, accumulation, MoE balancing)."""

import copy

import pytest
import torch

from strata.config import ModelConfig, TrainConfig
from strata.evals.mqar_train import mqar_model_config, train_mqar
from strata.models import build_model
from strata.nn.mlp import moe_layers
from strata.train.optim import build_optimizer
from strata.train.step import OptimizerStep

TINY = {"vocab_size": 64, "d_model": 32, "layout": "AM", "context_length": 32,
        "attention": {"n_heads": 2, "n_kv_heads": 2}, "mamba": {"d_ssm": 64, "d_state": 8, "head_dim": 16, "chunk_size": 8},
        "ffn": {"kind": "swiglu", "d_ffn": 64}}


def model_and_step(grad_accum: int, **train):
    torch.manual_seed(0)
    model = build_model(ModelConfig.model_validate(TINY))
    settings = TrainConfig(lr=1e-2, warmup=0, schedule="constant", grad_accum=grad_accum, **train)
    optimizer = build_optimizer(model, settings)
    return model, OptimizerStep(model, model, optimizer, settings, total_steps=10)


def batches(rows: int, parts: int):
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (rows, 17), generator=generator)
    pieces = list(zip(tokens[:, :-1].chunk(parts), tokens[:, 1:].chunk(parts), strict=True))
    return lambda: ({"tokens": pieces[0][0]}, pieces.pop(0)[1])


def test_two_accumulated_halves_are_one_whole_batch():
    whole_model, whole_step = model_and_step(grad_accum=1)
    split_model, split_step = model_and_step(grad_accum=2)
    whole = whole_step(batches(8, 1), 0)
    split = split_step(batches(8, 2), 0)
    assert split.loss == pytest.approx(whole.loss, rel=1e-5) and split.grad_norm == pytest.approx(whole.grad_norm, rel=1e-4)
    for a, b in zip(whole_model.parameters(), split_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_non_finite_step_changes_nothing_and_enough_of_them_stall_the_run():
    model, step = model_and_step(grad_accum=1, max_bad_steps=2)
    poison = {"on": True}
    step.forward = lambda tokens: model(tokens) * (float("nan") if poison["on"] else 1.0)
    before = copy.deepcopy(model.state_dict())
    outcome = step(batches(4, 1), 0)
    assert outcome.loss is None and outcome.record()["skipped"] == "non-finite loss or gradient"
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert step.stalled is None
    assert step(batches(4, 1), 1).loss is None and step.stalled == "loss or gradient non-finite for 2 steps in a row"
    poison["on"] = False
    assert step(batches(4, 1), 2).loss is not None and step.bad_in_a_row == 0 and step.stalled is None


def test_the_learning_rate_follows_the_schedule_position():
    _, step = model_and_step(grad_accum=1)
    step.train = TrainConfig(lr=1e-2, warmup=0.5, schedule="constant")
    assert step(batches(4, 1), 0).lr == pytest.approx(1e-2 / 5)
    assert step(batches(4, 1), 7).lr == pytest.approx(1e-2)


def test_mqar_training_takes_the_trainers_step():
    """Clipping from the settings (off: the norm is reported, not applied), accumulation, and the
    MoE experts balanced after each step, none of which the MQAR loop had before."""
    config = mqar_model_config("inter", d_model=32, n_layers=2, context_length=32, head_dim=16)
    moe = ModelConfig.model_validate({**config.model_dump(), "ffn": {"kind": "moe", "d_ffn": 32,
                                                                      "moe": {"n_experts": 4, "top_k": 1}}})
    model, history = train_mqar(moe, seq_len=32, n_pairs=4, steps=4, batch_size=8, lr=1e-2, clip=None, grad_accum=2,
                                eval_every=4, eval_examples=8)
    assert [set(record) >= {"loss", "lr", "grad_norm", "time"} for record in history] == [True] * 4
    biases = [layer.balance_bias for layer in moe_layers(model)]
    assert biases and all(bias.abs().sum() > 0 for bias in biases)  # balancing moved them

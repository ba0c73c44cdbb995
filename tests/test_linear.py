"""``project`` takes its shortcut past ``nn.Module.__call__`` only where it computes the same:
hooks, wrapped projections and training always see the module called."""

import torch
from torch import nn

from strata.config import ModelConfig
from strata.models import build_model
from strata.nn.linear import project

TINY = {"vocab_size": 64, "d_model": 32, "layout": "AMH", "context_length": 32,
        "attention": {"n_heads": 2, "n_kv_heads": 2}, "mamba": {"d_ssm": 64, "d_state": 8, "head_dim": 16, "chunk_size": 8},
        "hybrid": {"attention": {"n_heads": 1, "n_kv_heads": 1, "head_dim": 16},
                   "mamba": {"d_ssm": 32, "d_state": 8, "head_dim": 16, "chunk_size": 8}},
        "ffn": {"kind": "swiglu", "d_ffn": 64}}


def projections(model):
    return [module for module in model.modules() if type(module) is nn.Linear]


def count_calls(model):
    calls = []
    handles = [linear.register_forward_hook(lambda m, i, o: calls.append(m)) for linear in projections(model)]
    return calls, handles


def test_training_calls_every_projection_module():
    model = build_model(ModelConfig.model_validate(TINY))
    calls, _ = count_calls(model)
    model(torch.randint(0, 64, (2, 16))).sum().backward()
    trained = {id(m) for m in projections(model) if m.weight.grad is not None}
    assert {id(m) for m in calls} == trained  # every projection that took part went through __call__
    assert len(trained) >= 10  # attention, Mamba-2, hybrid and FFN projections all reached


def test_a_hooked_projection_is_called_while_decoding():
    """No grad (a decode step) but a hook: the module is called, so the hook fires and can change
    the output, as a LoRA or adapter hook would."""
    model = build_model(ModelConfig.model_validate(TINY)).eval()
    tokens = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        plain = model(tokens)
        target = projections(model)[0]
        handle = target.register_forward_hook(lambda m, i, o: o * 0)
        hooked = model(tokens)
        handle.remove()
    assert not torch.equal(plain, hooked)


def test_the_shortcut_equals_the_module_and_a_subclass_is_called():
    linear = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(project(linear, x), linear(x))

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    doubled = Doubled(8, 4)
    with torch.no_grad():
        assert torch.equal(project(doubled, x), 2 * nn.functional.linear(x, doubled.weight, doubled.bias))

"""The Triton kernels held to the PyTorch paths they replace on a GPU (outputs 1e-4, gradients
1e-3, fp32), run on the CPU by Triton's interpreter (TRITON_INTERPRET=1, which conftest.py sets
before anything imports triton), so the normal suite checks them without a GPU. Triton's wheels
are Linux-only."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if sys.platform != "linux":
    pytest.skip("triton (the test extra) installs on Linux only", allow_module_level=True)

from test_gated_deltanet import rule_inputs  # noqa: E402

import strata  # noqa: E402
from strata.nn import kernels  # noqa: E402
from strata.nn.conv import causal_conv1d, causal_conv1d_reference  # noqa: E402
from strata.nn.conv_triton import triton_causal_conv1d  # noqa: E402
from strata.nn.delta_rule import gated_delta_chunked, gated_delta_recurrent  # noqa: E402
from strata.nn.delta_rule_triton import triton_gated_delta_chunked  # noqa: E402
from strata.nn.ssd import ssd_chunked, ssd_recurrent  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def conv_inputs(batch=2, length=37, channels=40, width=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, channels, generator=generator, requires_grad=True)
    weight = torch.randn(channels, width, generator=generator, requires_grad=True)
    bias = torch.randn(channels, generator=generator, requires_grad=True)
    return x, weight, bias


def outputs_and_gradients(function, x, weight, bias, segment_ids=None):
    y = function(x, weight, bias, segment_ids)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    gradients = torch.autograd.grad((y * probe).sum(), [x, weight, bias])
    return y, gradients


@pytest.mark.parametrize("length, width", [(1, 4), (37, 4), (70, 4), (33, 2)])
def test_the_triton_conv_equals_the_pytorch_path(length, width):
    x, weight, bias = conv_inputs(length=length, width=width)
    expected = outputs_and_gradients(lambda x, w, b, s: causal_conv1d_reference(x, w, b), x, weight, bias)
    got = outputs_and_gradients(triton_causal_conv1d, x, weight, bias)
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)
    for mine, reference in zip(got[1], expected[1], strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-3, rtol=1e-3)


def test_the_triton_conv_keeps_segments_apart():
    x, weight, bias = conv_inputs(length=45)
    segment_ids = torch.tensor([[0] * 10 + [1] * 3 + [2] * 32, [0] * 44 + [1]])
    expected = outputs_and_gradients(causal_conv1d, x, weight, bias, segment_ids)  # the PyTorch path (on CPU)
    got = outputs_and_gradients(triton_causal_conv1d, x, weight, bias, segment_ids)
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)
    for mine, reference in zip(got[1], expected[1], strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-3, rtol=1e-3)


def test_strata_kernels_chooses_the_path(monkeypatch):
    x, weight, bias = conv_inputs(length=9)
    monkeypatch.setenv("STRATA_KERNELS", "auto")
    assert not kernels.use_triton(x)  # CPU tensors: the PyTorch path
    monkeypatch.setenv("STRATA_KERNELS", "triton")
    assert kernels.use_triton(x)
    torch.testing.assert_close(causal_conv1d(x, weight, bias), causal_conv1d_reference(x, weight, bias), atol=1e-4, rtol=1e-4)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):  # CPU tensors need the interpreter
        kernels.use_triton(x)
    monkeypatch.setenv("STRATA_KERNELS", "cuda")
    with pytest.raises(ValueError, match="STRATA_KERNELS='cuda'"):
        kernels.use_triton(x)


def scan_inputs(batch=2, length=45, heads=4, groups=2, head_dim=16, state=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, head_dim, generator=generator)
    dt = F.softplus(torch.randn(batch, length, heads, generator=generator) - 1)
    A = -torch.rand(heads, generator=generator) * 3
    B = torch.randn(batch, length, groups, state, generator=generator)
    C = torch.randn(batch, length, groups, state, generator=generator)
    initial = torch.randn(batch, heads, head_dim, state, generator=generator)
    return x, dt, A, B, C, initial


def scan_gradients(scan, inputs, probe_seed=1):
    """(y, final state) of ``scan(*inputs)`` and the gradients of a random projection of both
    with respect to every input."""
    y, state = scan(*inputs)
    generator = torch.Generator().manual_seed(probe_seed)
    probe = (y * torch.randn(y.shape, generator=generator)).sum() + (state * torch.randn(state.shape, generator=generator)).sum()
    return (y, state), torch.autograd.grad(probe, inputs)


@pytest.mark.parametrize("length, chunk, groups, with_resets",
                         [(45, 16, 2, False), (64, 32, 1, True), (7, 16, 4, False), (130, 64, 2, True)])
def test_the_triton_ssd_scan_equals_the_exact_recurrence(monkeypatch, length, chunk, groups, with_resets):
    """The Triton scan, forward and backward, against the step-by-step recurrence: outputs and
    final state 1e-4, the gradients of x, dt, A, B, C, D and the initial state 1e-3; with group
    sharing, a ragged last chunk, strong decays and segments starting inside the sequence (two
    resets side by side, and one on a chunk's first step)."""
    x, dt, A, B, C, initial = scan_inputs(length=length, groups=groups)
    dt = dt * 3  # decays down to exp(−9 · 3) a step
    D = torch.randn(4, generator=torch.Generator().manual_seed(5))
    resets = None
    if with_resets:
        resets = torch.zeros(2, length, dtype=torch.bool)
        resets[0, [5, chunk]] = True
        resets[1, [length // 2, length // 2 + 1]] = True
    inputs = [tensor.clone().requires_grad_() for tensor in (x, dt, A, B, C, D, initial)]

    def scan(recurrent):
        def run(x, dt, A, B, C, D, initial):
            if recurrent:
                return ssd_recurrent(x, dt, A, B, C, D, initial_state=initial, resets=resets)
            return ssd_chunked(x, dt, A, B, C, chunk, D, initial_state=initial, resets=resets)
        return run

    expected, expected_gradients = scan_gradients(scan(True), inputs)
    monkeypatch.setenv("STRATA_KERNELS", "triton")
    calls = count_calls(monkeypatch)
    got, gradients = scan_gradients(scan(False), inputs)
    assert calls == [1]  # the Triton scan ran
    for mine, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-4, rtol=1e-4)
    for name, mine, reference in zip(["x", "dt", "A", "B", "C", "D", "initial state"], gradients,
                                     expected_gradients, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-3, rtol=1e-3, msg=lambda m, name=name: f"d{name}: {m}")


def count_calls(monkeypatch) -> list[int]:
    """Counts the calls of ``ssd_triton.triton_chunked_scan`` (still running it)."""
    import strata.nn.ssd_triton as module

    calls, scan = [], module.triton_chunked_scan

    def counted(*args):
        calls.append(1)
        return scan(*args)

    monkeypatch.setattr(module, "triton_chunked_scan", counted)
    return calls


def test_the_ssd_scan_keeps_the_pytorch_path_for_chunks_the_kernels_do_not_take(monkeypatch):
    monkeypatch.setenv("STRATA_KERNELS", "triton")
    calls = count_calls(monkeypatch)
    x, dt, A, B, C, _ = scan_inputs(length=20)
    ssd_chunked(x, dt, A, B, C, 12)
    ssd_chunked(x, dt, A, B, C, 8)
    assert calls == []
    monkeypatch.setenv("STRATA_KERNELS", "auto")  # CPU tensors
    ssd_chunked(x, dt, A, B, C, 16)
    assert calls == []


# --- the gated delta rule (strata.nn.delta_rule_triton) --------------------------------------------


def delta_inputs(length, key_width=16, value_width=32, strong=False):
    """``rule_inputs`` as these tests take them: two heads, no gradient, log-decays of 0 to -1 a step
    (``strong``: -5 to -20)."""
    return rule_inputs(length, heads=2, key_width=key_width, value_width=value_width,
                       log_decay=(5.0, 20.0) if strong else (0.0, 1.0), requires_grad=False)


@pytest.mark.parametrize("length, chunk, key_width, value_width", [
    (37, 16, 16, 32), (45, 32, 24, 16), (1, 16, 16, 16), (45, 16, 16, 72), (70, 32, 24, 24),
])
def test_the_triton_delta_rule_equals_the_exact_recurrence(length, chunk, key_width, value_width):
    """The kernel itself against the step-by-step recurrence: outputs and final state 1e-4, from an
    initial state, with a ragged last chunk, key width ≠ value width (24: padded to 32), and value
    columns in two blocks (72)."""
    q, k, v, g, beta, initial = delta_inputs(length, key_width, value_width)
    expected = gated_delta_recurrent(q, k, v, g, beta, initial_state=initial)
    got = triton_gated_delta_chunked(q, k, v, g, beta, chunk, initial)
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], expected[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [16, 32])
@pytest.mark.parametrize("strong", [False, True], ids=["mild-decay", "strong-decay"])
def test_the_triton_delta_rule_keeps_segments_apart_and_strong_decays_exact(monkeypatch, chunk, strong):
    """``gated_delta_chunked`` through the kernel (STRATA_KERNELS=triton, no gradient) against the
    recurrence, with segments starting inside chunks, on a chunk boundary and one-step segments.
    Three resets in a chunk put its cumulative log-decays near −3e4, where float32 is 2e-3 apart:
    differenced in float32 instead of float64, they miss the final state by about 4e-4."""
    q, k, v, g, beta, initial = delta_inputs(45, key_width=24, strong=strong)
    resets = torch.zeros(2, 45, dtype=torch.bool)
    resets[0, [1, 2, 3, 32]] = True
    resets[1, [16, 33]] = True
    expected = gated_delta_recurrent(q, k, v, g, beta, initial_state=initial, resets=resets)
    monkeypatch.setenv("STRATA_KERNELS", "triton")
    with torch.no_grad():
        got = gated_delta_chunked(q, k, v, g, beta, chunk, initial_state=initial, resets=resets)
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], expected[1], atol=1e-4, rtol=1e-4)


def delta_gradients(rule, inputs, probe_seed=1):
    """((o, final state), the gradients of a random projection of both with respect to every input)
    of ``rule(*inputs)``."""
    o, state = rule(*inputs)
    generator = torch.Generator().manual_seed(probe_seed)
    probe = (o * torch.randn(o.shape, generator=generator)).sum() + (state * torch.randn(state.shape, generator=generator)).sum()
    return (o, state), torch.autograd.grad(probe, inputs)


def count_delta_calls(monkeypatch) -> list[int]:
    """Counts the calls of ``delta_rule_triton.triton_gated_delta_chunked`` (still running it)."""
    import strata.nn.delta_rule_triton as module

    calls = []

    def counted(*args):
        calls.append(1)
        return triton_gated_delta_chunked(*args)

    monkeypatch.setattr(module, "triton_gated_delta_chunked", counted)
    return calls


@pytest.mark.parametrize("length, chunk, key_width, value_width, strong, with_resets", [
    (37, 16, 16, 32, False, False), (45, 32, 24, 72, False, True), (45, 16, 20, 24, True, True),
    (70, 32, 32, 16, True, False), (1, 16, 16, 16, False, False),
], ids=["ragged", "two-value-blocks-resets", "strong-decay-resets", "strong-decay", "one-step"])
def test_the_triton_delta_rule_trains_as_the_exact_recurrence(monkeypatch, length, chunk, key_width, value_width,
                                                               strong, with_resets):
    """``gated_delta_chunked`` through the kernels, forward and backward (STRATA_KERNELS=triton,
    gradients wanted), against the step-by-step recurrence under autograd: outputs and final state
    1e-4, the gradients of q, k, v, g, β and the initial state 1e-3; with a ragged last chunk, key
    width ≠ value width and widths not a power of two, value columns in two blocks (72), strong
    decays, and segments starting inside chunks, on chunk boundaries and one step long."""
    q, k, v, g, beta, initial = delta_inputs(length, key_width, value_width, strong=strong)
    resets = None
    if with_resets:
        resets = torch.zeros(2, length, dtype=torch.bool)
        resets[0, [1, 2, 3, 32]] = True
        resets[1, [16, 33]] = True
    inputs = [tensor.clone().requires_grad_() for tensor in (q, k, v, g, beta, initial)]

    def recurrent(q, k, v, g, beta, initial):
        return gated_delta_recurrent(q, k, v, g, beta, initial_state=initial, resets=resets)

    def chunked(q, k, v, g, beta, initial):
        return gated_delta_chunked(q, k, v, g, beta, chunk, initial_state=initial, resets=resets)

    expected, expected_gradients = delta_gradients(recurrent, inputs)
    monkeypatch.setenv("STRATA_KERNELS", "triton")
    calls = count_delta_calls(monkeypatch)
    got, gradients = delta_gradients(chunked, inputs)
    assert calls == [1]  # the Triton rule ran
    for mine, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-4, rtol=1e-4)
    for name, mine, reference in zip(["q", "k", "v", "g", "beta", "initial state"], gradients,
                                     expected_gradients, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-3, rtol=1e-3, msg=lambda m, name=name: f"d{name}: {m}")


def test_the_delta_rule_takes_the_triton_path_with_and_without_gradients(monkeypatch):
    """STRATA_KERNELS=triton: the chunked rule is the kernels' answer, under no_grad and with a
    gradient wanted (the entering states kept only then); a chunk the kernels do not take keeps
    the PyTorch path."""
    import strata.nn.delta_rule_triton as module

    calls = count_delta_calls(monkeypatch)
    kept = []
    forward = module._forward

    def recorded(*args):
        kept.append(args[-1])
        return forward(*args)

    monkeypatch.setattr(module, "_forward", recorded)
    monkeypatch.setenv("STRATA_KERNELS", "triton")
    q, k, v, g, beta, initial = delta_inputs(20)
    with torch.no_grad():
        got = gated_delta_chunked(q, k, v, g, beta, 16, initial_state=initial)
    assert calls == [1] and kept == [False]
    direct = triton_gated_delta_chunked(q, k, v, g, beta, 16, initial)
    torch.testing.assert_close(got[0], direct[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], direct[1], atol=0, rtol=0)
    o, _ = gated_delta_chunked(q, k, v.requires_grad_(), g, beta, 16, initial_state=initial)
    assert calls == [1, 1] and kept[-1] is True and o.grad_fn is not None
    (o.square().sum()).backward()  # through the backward kernel
    assert v.grad is not None and v.grad.isfinite().all()
    with torch.no_grad():
        gated_delta_chunked(q, k, v, g, beta, 12, initial_state=initial)
    gated_delta_chunked(q, k, v, g, beta, 12, initial_state=initial)
    assert calls == [1, 1]
    with pytest.raises(ValueError, match="power of two"):
        triton_gated_delta_chunked(q, k, v, g, beta, 12, initial)


# --- the kernels inside the models -------------------------------------------------------------------


@pytest.mark.parametrize("preset, layout", [("mamba2", "MM"), ("intra", "HM"), ("gdn", "GG")])
def test_a_model_trains_alike_on_the_triton_and_the_pytorch_kernels(monkeypatch, preset, layout):
    """A tiny preset (two of its blocks, which the interpreter runs in seconds) on a row of three
    packed documents: the loss and every parameter's gradient the same (1e-4 / 1e-3) whether its
    convolutions, scans and delta rules run as Triton kernels or in PyTorch, and its evaluation
    logits the same (the kernels without gradients)."""
    config = strata.load_config(ROOT / "configs" / "tiny" / f"{preset}.yaml", [f"model.layout={layout}"]).model
    torch.manual_seed(0)
    model = strata.build_model(config)
    tokens = torch.randint(0, config.vocab_size, (1, 71), generator=torch.Generator().manual_seed(0))
    segments = torch.repeat_interleave(torch.arange(3), torch.tensor([33, 9, 28]))[None]

    def run(kernels):
        monkeypatch.setenv("STRATA_KERNELS", kernels)
        logits = model(tokens[:, :-1], segment_ids=segments)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        gradients = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            evaluated = model(tokens[:, :-1], segment_ids=segments)
        return loss, gradients, evaluated

    loss, gradients, evaluated = run("triton")
    expected_loss, expected_gradients, expected_evaluated = run("torch")
    torch.testing.assert_close(loss, expected_loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(evaluated, expected_evaluated, atol=1e-4, rtol=1e-4)
    for (name, _), mine, reference in zip(model.named_parameters(), gradients, expected_gradients, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-3, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")


def test_a_compiled_block_calls_the_kernels_within_its_graph(monkeypatch):
    """The kernels are custom operators: a Mamba-2 block compiles as one graph (fullgraph) with
    them inside, and its output and gradients equal the eager block's on the PyTorch path. (The
    aot_eager backend traces as inductor does, through AOTAutograd, without generating code.)"""
    config = strata.load_config(ROOT / "configs" / "tiny" / "mamba2.yaml").model
    torch.manual_seed(0)
    block = strata.build_model(config).blocks[0]
    x = torch.randn(1, 40, config.d_model, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def outputs(forward):
        y = forward(x)
        return (y, *torch.autograd.grad(y.square().sum(), [x, *block.parameters()]))

    monkeypatch.setenv("STRATA_KERNELS", "torch")
    expected = outputs(block)
    monkeypatch.setenv("STRATA_KERNELS", "triton")
    calls = count_calls(monkeypatch)
    got = outputs(torch.compile(block, backend="aot_eager", fullgraph=True))
    assert calls == [1]  # traced once into the graph
    for mine, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-4, rtol=1e-4)


def test_a_compiled_evaluation_calls_the_delta_rule_kernel_within_its_graph(monkeypatch):
    import strata.nn.delta_rule_triton as module

    calls = []

    def counted(*args):
        calls.append(1)
        return triton_gated_delta_chunked(*args)

    monkeypatch.setattr(module, "triton_gated_delta_chunked", counted)
    monkeypatch.setenv("STRATA_KERNELS", "triton")
    q, k, v, g, beta, initial = delta_inputs(20)
    with torch.no_grad():
        compiled = torch.compile(gated_delta_chunked, backend="aot_eager", fullgraph=True)
        got = compiled(q, k, v, g, beta, 16, initial_state=initial)
    assert calls == [1]
    expected = gated_delta_recurrent(q, k, v, g, beta, initial_state=initial)
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], expected[1], atol=1e-4, rtol=1e-4)


def test_a_compiled_training_step_calls_the_delta_rule_kernels_within_its_graph(monkeypatch):
    """With gradients wanted the forward and backward operators compile into one graph (fullgraph,
    AOTAutograd's forward and backward), and the gradients equal the recurrence's."""
    calls = count_delta_calls(monkeypatch)
    monkeypatch.setenv("STRATA_KERNELS", "triton")
    inputs = [tensor.clone().requires_grad_() for tensor in delta_inputs(20, key_width=24, value_width=20)]
    resets = torch.zeros(2, 20, dtype=torch.bool)
    resets[1, 7] = True
    compiled = torch.compile(gated_delta_chunked, backend="aot_eager", fullgraph=True)
    got, gradients = delta_gradients(
        lambda q, k, v, g, beta, initial: compiled(q, k, v, g, beta, 16, initial_state=initial, resets=resets), inputs)
    assert calls == [1]  # traced once into the graph
    expected, expected_gradients = delta_gradients(
        lambda q, k, v, g, beta, initial: gated_delta_recurrent(q, k, v, g, beta, initial_state=initial, resets=resets),
        inputs)
    for mine, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-4, rtol=1e-4)
    for name, mine, reference in zip(["q", "k", "v", "g", "beta", "initial state"], gradients,
                                     expected_gradients, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-3, rtol=1e-3, msg=lambda m, name=name: f"d{name}: {m}")

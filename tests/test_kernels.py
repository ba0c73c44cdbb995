"""The Triton kernels held to the PyTorch paths they replace on a GPU (outputs 1e-4, gradients
1e-3, fp32), run on the CPU by Triton's interpreter (TRITON_INTERPRET=1, which conftest.py sets
before anything imports triton), so the normal suite checks them without a GPU. Triton's wheels
are Linux-only."""

import sys

import pytest
import torch
import torch.nn.functional as F

if sys.platform != "linux":
    pytest.skip("triton (the test extra) installs on Linux only", allow_module_level=True)

from strata.nn import kernels  # noqa: E402
from strata.nn.conv import causal_conv1d, causal_conv1d_reference  # noqa: E402
from strata.nn.conv_triton import triton_causal_conv1d  # noqa: E402
from strata.nn.ssd import ssd_chunked, ssd_recurrent  # noqa: E402


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


@pytest.mark.parametrize("length, chunk, groups", [(45, 16, 2), (64, 32, 1), (7, 16, 4), (130, 64, 2)])
def test_the_triton_ssd_forward_equals_the_exact_recurrence(monkeypatch, length, chunk, groups):
    """Prefill through the Triton forward (no gradient wanted) against the step-by-step recurrence:
    outputs and final state 1e-4, with an initial state, group sharing and a ragged last chunk."""
    x, dt, A, B, C, initial = scan_inputs(length=length, groups=groups)
    D = torch.randn(4, generator=torch.Generator().manual_seed(5))
    expected = ssd_recurrent(x, dt, A, B, C, D, initial_state=initial)
    monkeypatch.setenv("STRATA_KERNELS", "triton")
    with torch.no_grad():
        got = ssd_chunked(x, dt, A, B, C, chunk, D, initial_state=initial)
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], expected[1], atol=1e-4, rtol=1e-4)


def test_the_ssd_scan_keeps_the_pytorch_path_where_the_kernel_does_not_apply(monkeypatch):
    """Gradients wanted, segments inside the sequence, or a chunk the kernel does not take: the
    PyTorch path, whatever STRATA_KERNELS says."""
    import strata.nn.ssd_triton as module

    calls = []
    monkeypatch.setattr(module, "triton_chunked_scan", lambda *args: calls.append(args))
    monkeypatch.setenv("STRATA_KERNELS", "triton")
    x, dt, A, B, C, _ = scan_inputs(length=20)
    ssd_chunked(x.requires_grad_(), dt, A, B, C, 16)
    with torch.no_grad():
        ssd_chunked(x, dt, A, B, C, 16, resets=torch.zeros(2, 20, dtype=torch.bool))
        ssd_chunked(x, dt, A, B, C, 12)
    assert calls == []

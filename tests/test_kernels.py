"""The Triton kernels held to the PyTorch paths they replace on a GPU (outputs 1e-4, gradients
1e-3, fp32), run on the CPU by Triton's interpreter, so the normal suite checks them without a
GPU. Triton reads TRITON_INTERPRET when a kernel is defined and when it runs, so it is set while
the kernels' module is imported and during these tests only (the rest of the suite, and the
processes it starts, run without it). Triton's wheels are Linux-only."""

import os
import sys

import pytest
import torch

if sys.platform != "linux":
    pytest.skip("triton (the test extra) installs on Linux only", allow_module_level=True)

from strata.nn import kernels  # noqa: E402
from strata.nn.conv import causal_conv1d, causal_conv1d_reference  # noqa: E402

os.environ["TRITON_INTERPRET"] = "1"
try:
    from strata.nn.conv_triton import triton_causal_conv1d  # noqa: E402
finally:
    del os.environ["TRITON_INTERPRET"]


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


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

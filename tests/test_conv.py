"""The hand-written causal depthwise convolution equals F.conv1d, values and gradients."""

import pytest
import torch

from strata.nn.conv import causal_conv1d, causal_conv1d_reference


@pytest.mark.parametrize("length,width", [(1, 4), (3, 4), (17, 4), (9, 2), (6, 1)])
def test_causal_conv_equals_conv1d(length, width):
    generator = torch.Generator().manual_seed(length)
    x = torch.randn(2, length, 6, generator=generator, requires_grad=True)
    weight = torch.randn(6, width, generator=generator, requires_grad=True)
    bias = torch.randn(6, generator=generator, requires_grad=True)
    probe = torch.randn(2, length, 6, generator=generator)
    fast = causal_conv1d(x, weight, bias)
    reference = causal_conv1d_reference(x, weight, bias)
    torch.testing.assert_close(fast, reference, atol=1e-6, rtol=1e-6)
    fast_grads = torch.autograd.grad((fast * probe).sum(), [x, weight, bias])
    reference_grads = torch.autograd.grad((reference * probe).sum(), [x, weight, bias])
    for a, b in zip(fast_grads, reference_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

"""The hand-written RMSNorm backward equals F.rms_norm; the gated norm equals its definition."""

import pytest
import torch
import torch.nn.functional as F

from strata.nn.norms import GatedRMSNorm, rms_norm


def grads(output, probe, inputs):
    return torch.autograd.grad((output * probe).sum(), inputs)


@pytest.mark.parametrize("shape", [(3, 7, 16), (1, 1, 8), (2, 5, 3, 12)])
def test_rms_norm_equals_reference(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=generator) * 3).requires_grad_()
    weight = torch.randn(shape[-1], generator=generator, requires_grad=True)
    probe = torch.randn(*shape, generator=generator)
    ours = rms_norm(x, weight, 1e-5)
    reference = F.rms_norm(x, (shape[-1],), weight, 1e-5)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads(ours, probe, [x, weight]), grads(reference, probe, [x, weight])):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_rms_norm_keeps_dtype_and_normalises_in_fp32():
    x = torch.randn(4, 64).bfloat16() * 100
    out = rms_norm(x, torch.ones(64), 1e-5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().pow(2).mean(-1), torch.ones(4), atol=2e-2, rtol=0)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_gated_norm_equals_definition(groups):
    generator = torch.Generator().manual_seed(groups)
    norm = GatedRMSNorm(16, groups, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=generator))
    y = torch.randn(2, 5, 16, generator=generator, requires_grad=True)
    z = torch.randn(2, 5, 16, generator=generator, requires_grad=True)
    probe = torch.randn(2, 5, 16, generator=generator)

    def definition(y, z):
        gated = (y * F.silu(z)).unflatten(-1, (groups, -1))
        return F.rms_norm(gated, (16 // groups,), eps=1e-5).flatten(-2) * norm.weight

    ours, reference = norm(y, z), definition(y, z)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    inputs = [y, z, norm.weight]
    for a, b in zip(grads(ours, probe, inputs), grads(reference, probe, inputs)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)

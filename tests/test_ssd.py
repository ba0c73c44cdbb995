"""The chunked SSD scan equals the exact recurrence: outputs, final states and gradients, in fp32."""

import pytest
import torch
import torch.nn.functional as F

from strata.nn.ssd import decay_matrix, ssd_chunked, ssd_recurrent, ssd_step


def random_inputs(batch, length, heads, head_dim, groups, state, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    tensors = dict(
        x=randn(batch, length, heads, head_dim),
        dt=F.softplus(randn(batch, length, heads) - 1.0),
        A=-torch.rand(heads, generator=generator) * 2.0 - 0.01,
        B=randn(batch, length, groups, state),
        C=randn(batch, length, groups, state),
        D=randn(heads),
        initial_state=randn(batch, heads, head_dim, state),
    )
    for tensor in tensors.values():
        tensor.requires_grad_(requires_grad)
    return tensors


CASES = [
    # (length, chunk): lengths below, equal to, and not divisible by the chunk
    (1, 8),
    (7, 8),
    (8, 8),
    (37, 8),
    (64, 16),
    (100, 32),
    (129, 64),
]


@pytest.mark.parametrize("length,chunk", CASES)
@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_equals_recurrence(length, chunk, groups):
    inputs = random_inputs(2, length, 4, 8, groups, 16, seed=length * 10 + groups)
    y_fast, state_fast = ssd_chunked(chunk_size=chunk, **inputs)
    y_ref, state_ref = ssd_recurrent(**inputs)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state_fast, state_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length,chunk", [(23, 8), (48, 16), (5, 16)])
def test_chunked_gradients_equal_recurrence(length, chunk):
    inputs = random_inputs(2, length, 2, 4, 1, 8, seed=length, requires_grad=True)
    probe = torch.randn(2, length, 2, 4, generator=torch.Generator().manual_seed(1))
    state_probe = torch.randn(2, 2, 4, 8, generator=torch.Generator().manual_seed(2))

    def grads(scan, **kwargs):
        y, state = scan(**inputs, **kwargs)
        loss = (y * probe).sum() + (state * state_probe).sum()
        return torch.autograd.grad(loss, list(inputs.values()))

    for fast, ref, name in zip(grads(ssd_chunked, chunk_size=chunk), grads(ssd_recurrent), inputs):
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"d/d{name}: {m}")


def test_result_does_not_depend_on_chunk_size():
    inputs = random_inputs(1, 96, 3, 4, 1, 8, seed=3)
    reference, _ = ssd_chunked(chunk_size=96, **inputs)
    for chunk in (1, 5, 16, 33, 128):
        y, _ = ssd_chunked(chunk_size=chunk, **inputs)
        torch.testing.assert_close(y, reference, atol=1e-5, rtol=1e-5)


def test_state_carries_across_calls():
    """Scanning a sequence in two pieces, passing the state, equals scanning it whole (prefill + continue)."""
    inputs = random_inputs(2, 50, 2, 4, 1, 8, seed=4)
    whole, final = ssd_chunked(chunk_size=16, **inputs)
    first = {k: (v[:, :30] if v.dim() >= 3 and v.shape[1] == 50 else v) for k, v in inputs.items()}
    y1, state = ssd_chunked(chunk_size=16, **first)
    second = {k: (v[:, 30:] if v.dim() >= 3 and v.shape[1] == 50 else v) for k, v in inputs.items()}
    second["initial_state"] = state
    y2, final2 = ssd_chunked(chunk_size=16, **second)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final2, final, atol=1e-5, rtol=1e-5)


def test_strong_decay_stays_exact():
    """Large cumulative decays (long chunks, big dt·|A|) must not lose precision."""
    inputs = random_inputs(1, 256, 2, 4, 1, 8, seed=5)
    inputs["dt"] = inputs["dt"] * 20
    y_fast, _ = ssd_chunked(chunk_size=256, **inputs)
    y_ref, _ = ssd_recurrent(**inputs)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_a_step_in_place_equals_the_step_that_copies(groups):
    """Decoding's in-place step writes into the given fp32 state the state the copying step
    returns (and the same output), and refuses a state it could not hold in fp32."""
    inputs = random_inputs(3, 1, 4, 8, groups, 16, seed=8 + groups)
    args = [inputs[name][:, 0] for name in ("x", "dt")] + [inputs["A"]] + [inputs[name][:, 0] for name in ("B", "C")]
    y, state = ssd_step(inputs["initial_state"], *args, inputs["D"])
    held = inputs["initial_state"].clone()
    y_in_place, returned = ssd_step(held, *args, inputs["D"], in_place=True)
    torch.testing.assert_close(y_in_place, y, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(held, state, atol=1e-6, rtol=1e-6)
    assert returned.data_ptr() == held.data_ptr()
    with pytest.raises(ValueError, match="fp32 state"):
        ssd_step(inputs["initial_state"].bfloat16(), *args, inputs["D"], in_place=True)


def test_decay_matrix():
    """L[l, s] = exp(a[s+1] + ... + a[l]) on and below the diagonal, 0 above."""
    log_decays = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)
    e = torch.exp
    expected = torch.tensor(
        [[1.0, 0.0, 0.0], [e(torch.tensor(-2.0)), 1.0, 0.0], [e(torch.tensor(-5.0)), e(torch.tensor(-3.0)), 1.0]]
    )
    torch.testing.assert_close(decay_matrix(log_decays.cumsum(0)), expected)


def test_bf16_inputs_accumulate_in_fp32():
    inputs = random_inputs(1, 40, 2, 4, 1, 8, seed=6)
    low = {k: v.bfloat16() if k in ("x", "B", "C") else v for k, v in inputs.items()}
    y, state = ssd_chunked(chunk_size=16, **low)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    y_ref, _ = ssd_recurrent(**{k: v.float() for k, v in low.items()})
    torch.testing.assert_close(y.float(), y_ref, atol=3e-2, rtol=3e-2)



def test_backward_accepts_broadcast_output_gradients():
    """``y.sum().backward()`` hands the scan an expanded (stride-0) gradient."""
    inputs = random_inputs(2, 40, 4, 4, 2, 8, seed=7, requires_grad=True)
    y, _ = ssd_chunked(chunk_size=16, **inputs)
    y.sum().backward()
    reference = {name: tensor.detach().clone().requires_grad_() for name, tensor in inputs.items()}
    ssd_recurrent(**reference)[0].sum().backward()
    for name in inputs:
        torch.testing.assert_close(inputs[name].grad, reference[name].grad, atol=1e-4, rtol=1e-5)

"""The gated delta rule's chunked forward pass (``strata.nn.delta_rule``) as one Triton kernel:
prefill and evaluation on a GPU, where no gradient is needed. Training keeps the PyTorch path,
forward and backward (its autograd through the chunked matmuls), until a backward kernel exists.

The columns of the state evolve independently (column j of S reads only column j of V), so one
program takes a (batch row, head, block of BLOCK_V value columns), holds its state tile
S [BLOCK_K, BLOCK_V] in fp32 registers (the key width whole, padded to a power of two) and walks
the chunks in order. Per chunk of Q steps, with γ the within-chunk cumulative log-decay and
Γ[i, j] = exp(γ_i − γ_j) for i >= j (0 above the diagonal):
  1. A = tril₋₁(diag(β) K Kᵀ ∘ Γ)                        [Q, Q]
  2. T = (I + A)⁻¹ by forward substitution, row after row: T_i = e_i − Σ_{j<i} A_ij T_j
     (products of powers of A, the doubling that would avoid the loop, lose fp32 precision);
  3. the corrections δ = T β (V − (K ∘ e^γ) S₀)          [Q, BLOCK_V]
     (δ = U − W S₀ of the module docstring of ``delta_rule``, with S₀ at hand, in one product);
  4. O = (Q ∘ e^γ) S₀ + (Q Kᵀ ∘ Γ) δ, stored;
  5. S ← e^{γ_Q} S₀ + (K ∘ e^{γ_Q − γ})ᵀ δ.
A and T are recomputed by each block of value columns (one block when v <= BLOCK_V). The
cumulative log-decays are summed per chunk in float64 by PyTorch and their differences taken in
float64 in the kernel, as the PyTorch path takes them: large cumulative log-decays (strong decays,
and the −1e4 that ``resets`` put on a segment's first step, whose exponential must be exactly 0)
cancel in float32, where a few resets in a chunk already put γ 2e-3 apart.
Everything else is fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Products in full fp32 ("ieee"), as the PyTorch path computes them; on a GPU tf32 would be
# faster, at a precision the tests (1e-4) do not allow. A choice for measuring there.
PRECISION: tl.constexpr = tl.constexpr("ieee")


@triton.jit
def _chunked_forward(q, k, v, cum, beta, initial, o, final, T, H, K, V, CHUNKS, Q: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    row_head, tile_v = tl.program_id(0), tl.program_id(1)
    row, head = row_head // H, row_head % H
    steps = tl.arange(0, Q)
    keys = tl.arange(0, BLOCK_K)
    values = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
    key_ok, value_ok = keys < K, values < V
    below = steps[:, None] >= steps[None, :]
    identity = tl.where(steps[:, None] == steps[None, :], 1.0, 0.0)
    state_at = (row_head.to(tl.int64) * K + keys)[:, None] * V + values[None, :]
    state_ok = key_ok[:, None] & value_ok[None, :]
    state = tl.load(initial + state_at, mask=state_ok, other=0.0)  # S₀ [BLOCK_K, BLOCK_V]
    for chunk in range(CHUNKS):
        start = row.to(tl.int64) * T + chunk * Q
        at = (start + steps) * H + head  # [Q]: the chunk's steps of this head
        k_c = tl.load(k + at[:, None] * K + keys[None, :], mask=key_ok[None, :], other=0.0)
        q_c = tl.load(q + at[:, None] * K + keys[None, :], mask=key_ok[None, :], other=0.0)
        v_c = tl.load(v + at[:, None] * V + values[None, :], mask=value_ok[None, :], other=0.0)
        beta_c = tl.load(beta + at)
        cum_c = tl.load(cum + at)  # float64
        last = tl.load(cum + (start + Q - 1) * H + head)  # γ_Q, float64
        # Γ: masked before the exponential, where γ_i − γ_j > 0 could overflow
        Gamma = tl.exp(tl.where(below, cum_c[:, None] - cum_c[None, :], float("-inf")).to(tl.float32))
        decay_in = tl.exp(cum_c.to(tl.float32))  # e^{γ_i}
        decay_out = tl.exp((last - cum_c).to(tl.float32))  # e^{γ_Q − γ_i}
        k_beta = k_c * beta_c[:, None]
        A = tl.where(steps[:, None] > steps[None, :],
                     tl.dot(k_beta, tl.trans(k_c), input_precision=PRECISION) * Gamma, 0.0)
        # T = (I + A)⁻¹: row i is e_i − Σ_{j<i} A_ij T_j, the rows j < i being final already
        inverse = identity
        for i in range(1, Q):
            a_i = tl.sum(tl.where(steps[:, None] == i, A, 0.0), axis=0)  # row i of A, [Q] over j
            t_i = tl.sum(a_i[:, None] * inverse, axis=0)  # Σ_j A_ij T_j
            inverse = tl.where(steps[:, None] == i, inverse - t_i[None, :], inverse)
        # δ = T (βV − (βK ∘ e^γ) S₀)
        written = v_c * beta_c[:, None] - tl.dot(k_beta * decay_in[:, None], state, input_precision=PRECISION)
        delta = tl.dot(inverse, written, input_precision=PRECISION)  # [Q, BLOCK_V]
        scores = tl.dot(q_c, tl.trans(k_c), input_precision=PRECISION) * Gamma
        out = (tl.dot(q_c * decay_in[:, None], state, input_precision=PRECISION)
               + tl.dot(scores, delta, input_precision=PRECISION))
        tl.store(o + at[:, None] * V + values[None, :], out, mask=value_ok[None, :])
        state = (state * tl.exp(last.to(tl.float32))
                 + tl.dot(tl.trans(k_c * decay_out[:, None]), delta, input_precision=PRECISION))
    tl.store(final + state_at, state, mask=state_ok)


def triton_gated_delta_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, chunk_size: int,
                               initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [b, t, h, v], final state [b, h, k, v]), both fp32: the forward of
    ``delta_rule.gated_delta_chunked``, with any ``resets`` already folded into the log-decays g
    (``delta_rule._reset_log_decay``)."""
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"the Triton gated delta rule takes chunks of a power of two of at least 16 steps, got {chunk_size}")
    if initial_state is None:
        initial_state = v.new_zeros(k.shape[0], k.shape[2], k.shape[3], v.shape[3], dtype=torch.float32)
    return _forward(q.float(), k.float(), v.float(), g.float(), beta.float(), initial_state.float(), chunk_size)


# A custom operator, so torch.compile keeps the kernel whole in its graph (a compiled model
# calls it without a graph break).
@torch.library.custom_op("strata::gated_delta_forward", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
             initial_state: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch, length, heads, key_width = k.shape
    value_width = v.shape[-1]
    Q = chunk_size
    pad = (-length) % Q
    if pad:  # padded steps write nothing (β = 0) and do not decay (g = 0): the final state is unaffected
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, 0, 0, pad)), F.pad(beta, (0, 0, 0, pad))
    T, chunks = length + pad, (length + pad) // Q
    q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
    cum = g.double().view(batch, chunks, Q, heads).cumsum(2).view(batch, T, heads).contiguous()
    block_k = max(16, triton.next_power_of_2(key_width))
    block_v = min(max(16, triton.next_power_of_2(value_width)), 64 if block_k <= 128 else 32)
    o = torch.empty(batch, T, heads, value_width, dtype=torch.float32, device=v.device)
    final = torch.empty(batch, heads, key_width, value_width, dtype=torch.float32, device=v.device)
    _chunked_forward[(batch * heads, triton.cdiv(value_width, block_v))](
        q, k, v, cum, beta, initial_state.contiguous(), o, final, T, heads, key_width, value_width, chunks, Q,
        BLOCK_K=block_k, BLOCK_V=block_v)
    return o[:, :length].contiguous(), final


@_forward.register_fake
def _(q, k, v, g, beta, initial_state, chunk_size):
    return v.new_empty(v.shape, dtype=torch.float32), initial_state.new_empty(initial_state.shape)

"""The gated delta rule's chunked algorithm (``strata.nn.delta_rule``) as Triton kernels, forward
and backward: prefill, evaluation and training on a GPU (chosen by ``strata.nn.kernels``); the
PyTorch path stays the CPU path and, with the exact recurrence, the tests' oracle.

The columns of the state evolve independently (column j of S reads only column j of V), so each
kernel runs one program per (batch row, head, block of BLOCK_V value columns), holds its state
tile [BLOCK_K, BLOCK_V] in fp32 registers (the key width whole, padded to a power of two) and walks
the chunks. Per chunk of Q steps, with γ the within-chunk cumulative log-decay,
Γ[i, j] = exp(γ_i − γ_j) for i >= j (0 above the diagonal), e^γ the decay from the chunk's start
to step i and e^{γ_Q − γ} from step i to its end:

  forward (``_chunked_forward``, chunks in order; the state entering each chunk is stored for the
  backward when a gradient is wanted)
    1. A = tril₋₁(diag(β) K Kᵀ ∘ Γ)                        [Q, Q]
    2. T = (I + A)⁻¹ by forward substitution, row after row: T_i = e_i − Σ_{j<i} A_ij T_j
       (products of powers of A, the doubling that would avoid the loop, lose fp32 precision);
    3. the corrections δ = T (βV − (βK ∘ e^γ) S₀)          [Q, BLOCK_V]
       (δ = U − W S₀ of the module docstring of ``delta_rule``, with S₀ at hand, in one product);
    4. O = (Q ∘ e^γ) S₀ + P δ with P = Q Kᵀ ∘ Γ, stored;
    5. S ← e^{γ_Q} S₀ + (K ∘ e^{γ_Q − γ})ᵀ δ.
  backward (``_chunked_backward``, chunks from last to first, dS the gradient of the state
  leaving the chunk, d_final at first): steps 1-3 again from the stored entering state S₀, then
    dδ = Pᵀ dO + (K ∘ e^{γ_Q − γ}) dS,   dW = Tᵀ dδ  (W = βV − (βK ∘ e^γ) S₀, so dV = β ∘ dW),
    dP = dO δᵀ,   dA = −tril₋₁(Tᵀ dT Tᵀ) = −tril₋₁(dW δᵀ)  (dT = dδ Wᵀ, and T W = δ),
    dQ = e^γ ∘ dO S₀ᵀ + (dP ∘ Γ) K,
    d(βK) = −e^γ ∘ dW S₀ᵀ + (dA ∘ Γ) K,
    dK = e^{γ_Q − γ} ∘ δ dSᵀ + (dP ∘ Γ)ᵀ Q + (dA ∘ Γ)ᵀ βK + β ∘ d(βK),
    dβ = Σ_columns (V ∘ dW) + Σ_keys (K ∘ d(βK)),
    dγ_i = Σ_j (G_ij − G_ji) with G = dP ∘ P + dA ∘ A (through Γ)
           + e^{γ_i} (Q_i · d(Q ∘ e^γ)_i + βK_i · d(βK ∘ e^γ)_i)
           − e^{γ_Q − γ_i} K_i · d(K ∘ e^{γ_Q − γ})_i,
    and at the last step also, through γ_Q, Σ_i e^{γ_Q − γ_i} K_i · d(K ∘ e^{γ_Q − γ})_i
    + e^{γ_Q} Σ S₀ ∘ dS; then the gradient of the state entering the chunk, for the one before:
    dS₀ = e^{γ_Q} dS + (Q ∘ e^γ)ᵀ dO − (βK ∘ e^γ)ᵀ dW.
  dV and dS₀ belong to the program's value columns; the gradients of q, k, β and γ sum over all
  of them, so each block of columns writes its share to a buffer [blocks, ...] and PyTorch sums
  the shares (the same result on every run: no atomics), then turns dγ into the gradient of the
  log-decays (a reverse cumulative sum within each chunk).
A and T are recomputed by each block of value columns (one block when v <= BLOCK_V), in the
backward as in the forward. The backward holds some twenty [Q, Q], [Q, BLOCK_K] and
[BLOCK_K, BLOCK_V] tiles at once: on a GPU, at Q = 64 and widths of 128, expect spills, which
smaller value blocks or more warps would ease (not yet measured there).
The cumulative log-decays are summed per chunk in float64 by PyTorch and their differences taken
in float64 in the kernels, as the PyTorch path takes them: large cumulative log-decays (strong
decays, and the −1e4 that ``resets`` put on a segment's first step, whose exponential must be
exactly 0) cancel in float32, where a few resets in a chunk already put γ 2e-3 apart; entries
masked out are −inf before the exponential, which would overflow there. Everything else is fp32.
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
def _chunk_terms(q, k, cum, beta, start, head, H, K, Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """What both passes compute of a chunk from its keys, queries, β and log-decays, whichever
    value columns they take: (q_c, k_c, β, βK, Γ, e^γ, e^{γ_Q − γ}, e^{γ_Q}, A, P = Q Kᵀ ∘ Γ,
    T = (I + A)⁻¹), the decays in fp32 from float64 differences."""
    steps, keys = tl.arange(0, Q), tl.arange(0, BLOCK_K)
    key_ok = keys < K
    at = (start + steps) * H + head  # [Q]: the chunk's steps of this head
    k_c = tl.load(k + at[:, None] * K + keys[None, :], mask=key_ok[None, :], other=0.0)
    q_c = tl.load(q + at[:, None] * K + keys[None, :], mask=key_ok[None, :], other=0.0)
    beta_c = tl.load(beta + at)
    cum_c = tl.load(cum + at)  # float64
    last = tl.load(cum + (start + Q - 1) * H + head)  # γ_Q, float64
    # Γ: masked before the exponential, where γ_i − γ_j > 0 could overflow
    below = steps[:, None] >= steps[None, :]
    Gamma = tl.exp(tl.where(below, cum_c[:, None] - cum_c[None, :], float("-inf")).to(tl.float32))
    decay_in = tl.exp(cum_c.to(tl.float32))  # e^{γ_i}
    decay_out = tl.exp((last - cum_c).to(tl.float32))  # e^{γ_Q − γ_i}
    chunk_decay = tl.exp(last.to(tl.float32))  # e^{γ_Q}
    k_beta = k_c * beta_c[:, None]
    A = tl.where(steps[:, None] > steps[None, :],
                 tl.dot(k_beta, tl.trans(k_c), input_precision=PRECISION) * Gamma, 0.0)
    scores = tl.dot(q_c, tl.trans(k_c), input_precision=PRECISION) * Gamma
    # T = (I + A)⁻¹: row i is e_i − Σ_{j<i} A_ij T_j, the rows j < i being final already
    inverse = tl.where(steps[:, None] == steps[None, :], 1.0, 0.0)
    for i in range(1, Q):
        a_i = tl.sum(tl.where(steps[:, None] == i, A, 0.0), axis=0)  # row i of A, [Q] over j
        t_i = tl.sum(a_i[:, None] * inverse, axis=0)  # Σ_j A_ij T_j
        inverse = tl.where(steps[:, None] == i, inverse - t_i[None, :], inverse)
    return q_c, k_c, beta_c, k_beta, Gamma, decay_in, decay_out, chunk_decay, A, scores, inverse


@triton.jit
def _program_tile(H, K, V, Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """What a program of the rule's kernels works on: (row, head) and a block of value columns,
    the chunk's steps, its key and value indices, and where its [BLOCK_K, BLOCK_V] state tile is."""
    row_head, tile_v = tl.program_id(0), tl.program_id(1)
    row, head = row_head // H, row_head % H
    steps = tl.arange(0, Q)
    keys = tl.arange(0, BLOCK_K)
    values = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
    key_ok, value_ok = keys < K, values < V
    state_at = (row_head.to(tl.int64) * K + keys)[:, None] * V + values[None, :]
    state_ok = key_ok[:, None] & value_ok[None, :]
    return row_head, tile_v, row, head, steps, keys, values, key_ok, value_ok, state_at, state_ok


@triton.jit
def _chunked_forward(q, k, v, cum, beta, initial, o, final, entering, T, H, K, V, CHUNKS, Q: tl.constexpr,
                     KEEP_ENTERING: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    row_head, tile_v, row, head, steps, keys, values, key_ok, value_ok, state_at, state_ok = _program_tile(
        H, K, V, Q, BLOCK_K, BLOCK_V)
    state = tl.load(initial + state_at, mask=state_ok, other=0.0)  # S₀ [BLOCK_K, BLOCK_V]
    for chunk in range(CHUNKS):
        if KEEP_ENTERING:  # [b, h, c, k, v]
            tl.store(entering + ((row_head.to(tl.int64) * CHUNKS + chunk) * K + keys)[:, None] * V + values[None, :],
                     state, mask=state_ok)
        start = row.to(tl.int64) * T + chunk * Q
        at = (start + steps) * H + head
        q_c, k_c, beta_c, k_beta, Gamma, decay_in, decay_out, chunk_decay, A, scores, inverse = _chunk_terms(
            q, k, cum, beta, start, head, H, K, Q, BLOCK_K)
        v_c = tl.load(v + at[:, None] * V + values[None, :], mask=value_ok[None, :], other=0.0)
        # δ = T (βV − (βK ∘ e^γ) S₀)
        written = v_c * beta_c[:, None] - tl.dot(k_beta * decay_in[:, None], state, input_precision=PRECISION)
        delta = tl.dot(inverse, written, input_precision=PRECISION)  # [Q, BLOCK_V]
        out = (tl.dot(q_c * decay_in[:, None], state, input_precision=PRECISION)
               + tl.dot(scores, delta, input_precision=PRECISION))
        tl.store(o + at[:, None] * V + values[None, :], out, mask=value_ok[None, :])
        state = state * chunk_decay + tl.dot(tl.trans(k_c * decay_out[:, None]), delta, input_precision=PRECISION)
    tl.store(final + state_at, state, mask=state_ok)


@triton.jit
def _chunked_backward(q, k, v, cum, beta, entering, do, d_final, dv, dq_parts, dk_parts, dbeta_parts, dcum_parts,
                      d_initial, T, H, K, V, CHUNKS, STEPS, Q: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    """The chunks from last to first, carrying dS; dv and d_initial for the program's value columns,
    and its columns' shares of dq, dk, dβ and dγ into part ``tile_v`` of the buffers (STEPS = b·T·h
    steps of heads a part)."""
    row_head, tile_v, row, head, steps, keys, values, key_ok, value_ok, state_at, state_ok = _program_tile(
        H, K, V, Q, BLOCK_K, BLOCK_V)
    part = tile_v.to(tl.int64) * STEPS
    d_state = tl.load(d_final + state_at, mask=state_ok, other=0.0)  # dS [BLOCK_K, BLOCK_V]
    for reversed_chunk in range(CHUNKS):
        chunk = CHUNKS - 1 - reversed_chunk
        start = row.to(tl.int64) * T + chunk * Q
        at = (start + steps) * H + head
        q_c, k_c, beta_c, k_beta, Gamma, decay_in, decay_out, chunk_decay, A, scores, inverse = _chunk_terms(
            q, k, cum, beta, start, head, H, K, Q, BLOCK_K)
        v_c = tl.load(v + at[:, None] * V + values[None, :], mask=value_ok[None, :], other=0.0)
        do_c = tl.load(do + at[:, None] * V + values[None, :], mask=value_ok[None, :], other=0.0)
        state = tl.load(entering + ((row_head.to(tl.int64) * CHUNKS + chunk) * K + keys)[:, None] * V
                        + values[None, :], mask=state_ok, other=0.0)  # S₀
        k_out = k_c * decay_out[:, None]
        written = v_c * beta_c[:, None] - tl.dot(k_beta * decay_in[:, None], state, input_precision=PRECISION)
        delta = tl.dot(inverse, written, input_precision=PRECISION)
        # δ reaches O through P and S_end through K ∘ e^{γ_Q − γ}
        d_delta = (tl.dot(tl.trans(scores), do_c, input_precision=PRECISION)
                   + tl.dot(k_out, d_state, input_precision=PRECISION))
        d_written = tl.dot(tl.trans(inverse), d_delta, input_precision=PRECISION)  # dW = Tᵀ dδ
        tl.store(dv + at[:, None] * V + values[None, :], d_written * beta_c[:, None], mask=value_ok[None, :])
        d_scores = tl.dot(do_c, tl.trans(delta), input_precision=PRECISION)  # dP = dO δᵀ
        # dA = −tril₋₁(Tᵀ dT Tᵀ) with dT = dδ Wᵀ: −tril₋₁(dW δᵀ)
        d_A = tl.where(steps[:, None] > steps[None, :],
                       -tl.dot(d_written, tl.trans(delta), input_precision=PRECISION), 0.0)
        d_scores_g, d_A_g = d_scores * Gamma, d_A * Gamma
        d_q_in = tl.dot(do_c, tl.trans(state), input_precision=PRECISION)  # d(Q ∘ e^γ)
        d_k_in = -tl.dot(d_written, tl.trans(state), input_precision=PRECISION)  # d(βK ∘ e^γ)
        d_k_out = tl.dot(delta, tl.trans(d_state), input_precision=PRECISION)  # d(K ∘ e^{γ_Q − γ})
        dq = d_q_in * decay_in[:, None] + tl.dot(d_scores_g, k_c, input_precision=PRECISION)
        d_k_beta = d_k_in * decay_in[:, None] + tl.dot(d_A_g, k_c, input_precision=PRECISION)
        dk = (d_k_out * decay_out[:, None] + tl.dot(tl.trans(d_scores_g), q_c, input_precision=PRECISION)
              + tl.dot(tl.trans(d_A_g), k_beta, input_precision=PRECISION) + d_k_beta * beta_c[:, None])
        dbeta = tl.sum(v_c * d_written, axis=1) + tl.sum(k_c * d_k_beta, axis=1)
        # dγ: through Γ (+ at row i, − at column j), e^γ, e^{γ_Q − γ} and, at the last step, e^{γ_Q}
        through_gamma = d_scores * scores + d_A * A
        through_out = decay_out * tl.sum(k_c * d_k_out, axis=1)
        to_last = tl.sum(through_out, axis=0) + chunk_decay * tl.sum(tl.sum(state * d_state, axis=1), axis=0)
        dcum = (tl.sum(through_gamma, axis=1) - tl.sum(through_gamma, axis=0)
                + decay_in * (tl.sum(q_c * d_q_in, axis=1) + tl.sum(k_beta * d_k_in, axis=1))
                - through_out + tl.where(steps == Q - 1, to_last, 0.0))
        tl.store(dq_parts + (part + at)[:, None] * K + keys[None, :], dq, mask=key_ok[None, :])
        tl.store(dk_parts + (part + at)[:, None] * K + keys[None, :], dk, mask=key_ok[None, :])
        tl.store(dbeta_parts + part + at, dbeta)
        tl.store(dcum_parts + part + at, dcum)
        # the state entering this chunk: dS₀ = e^{γ_Q} dS + (Q ∘ e^γ)ᵀ dO − (βK ∘ e^γ)ᵀ dW
        d_state = (d_state * chunk_decay
                   + tl.dot(tl.trans(q_c * decay_in[:, None]), do_c, input_precision=PRECISION)
                   - tl.dot(tl.trans(k_beta * decay_in[:, None]), d_written, input_precision=PRECISION))
    tl.store(d_initial + state_at, d_state, mask=state_ok)


def triton_gated_delta_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, chunk_size: int,
                               initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [b, t, h, v], final state [b, h, k, v]), both fp32, differentiable: the forward of
    ``delta_rule.gated_delta_chunked``, with any ``resets`` already folded into the log-decays g
    (``delta_rule._reset_log_decay``)."""
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"the Triton gated delta rule takes chunks of a power of two of at least 16 steps, got {chunk_size}")
    if initial_state is None:
        initial_state = v.new_zeros(k.shape[0], k.shape[2], k.shape[3], v.shape[3], dtype=torch.float32)
    inputs = (q.float(), k.float(), v.float(), g.float(), beta.float(), initial_state.float())
    # The entering states ([b, h, c, k, v], c·k·v floats a head where the inputs are t·(2k + v))
    # are written only for a backward to come.
    keep = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    o, final, _ = _forward(*inputs, chunk_size, keep)
    return o, final


def _blocks(key_width: int, value_width: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_V): the key width whole, the value columns in blocks of at most 64 (32 for
    keys wider than 128)."""
    block_k = max(16, triton.next_power_of_2(key_width))
    return block_k, min(max(16, triton.next_power_of_2(value_width)), 64 if block_k <= 128 else 32)


def _padded(chunk_size: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """[b, t, h, ...] tensors padded with zeros to whole chunks, contiguous: padded steps write
    nothing (β = 0) and do not decay (g = 0), so the final state is unaffected."""
    pad = (-tensors[0].shape[1]) % chunk_size
    return [F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)).contiguous() for x in tensors]


def _cumulative(g: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """The within-chunk cumulative log-decays [b, T, h] of padded g, in float64."""
    batch, T, heads = g.shape
    return g.double().view(batch, T // chunk_size, chunk_size, heads).cumsum(2).view(batch, T, heads).contiguous()


# The rule is a pair of custom operators (forward and backward), so torch.compile keeps the
# kernels whole in its graph (a compiled model calls them without a graph break) and autograd
# pairs them through ``register_autograd``.
@torch.library.custom_op("strata::gated_delta_forward", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
             initial_state: torch.Tensor, chunk_size: int, keep_entering: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, final state, the state entering each chunk [b, h, c, k, v] for the backward; with
    ``keep_entering`` false, [b, h, 0, k, v] and nothing written)."""
    batch, length, heads, key_width = k.shape
    value_width = v.shape[-1]
    q, k, v, g, beta = _padded(chunk_size, q, k, v, g, beta)
    T = q.shape[1]
    chunks = T // chunk_size
    cum = _cumulative(g, chunk_size)
    block_k, block_v = _blocks(key_width, value_width)
    o = torch.empty(batch, T, heads, value_width, dtype=torch.float32, device=v.device)
    final = torch.empty(batch, heads, key_width, value_width, dtype=torch.float32, device=v.device)
    entering = torch.empty(batch, heads, chunks if keep_entering else 0, key_width, value_width,
                           dtype=torch.float32, device=v.device)
    _chunked_forward[(batch * heads, triton.cdiv(value_width, block_v))](
        q, k, v, cum, beta, initial_state.contiguous(), o, final, entering, T, heads, key_width, value_width,
        chunks, chunk_size, KEEP_ENTERING=keep_entering, BLOCK_K=block_k, BLOCK_V=block_v)
    return o[:, :length].contiguous(), final, entering


@_forward.register_fake
def _(q, k, v, g, beta, initial_state, chunk_size, keep_entering):
    batch, length, heads, key_width = k.shape
    chunks = -(-length // chunk_size) if keep_entering else 0
    return (v.new_empty(v.shape, dtype=torch.float32), initial_state.new_empty(initial_state.shape),
            v.new_empty(batch, heads, chunks, key_width, v.shape[-1], dtype=torch.float32))


@torch.library.custom_op("strata::gated_delta_backward", mutates_args=())
def _backward_op(do: torch.Tensor, d_final: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 g: torch.Tensor, beta: torch.Tensor, entering: torch.Tensor, chunk_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of q, k, v, g, β and the initial state (fp32)."""
    batch, length, heads, key_width = k.shape
    value_width = v.shape[-1]
    q, k, v, g, beta, do = _padded(chunk_size, q, k, v, g, beta, do.float())
    T = q.shape[1]
    chunks = T // chunk_size
    if entering.shape[2] != chunks:
        raise ValueError(f"the backward needs the state entering each of the {chunks} chunks, got {entering.shape[2]}")
    cum = _cumulative(g, chunk_size)
    block_k, block_v = _blocks(key_width, value_width)
    blocks = triton.cdiv(value_width, block_v)
    dv = torch.empty_like(v)
    dq_parts, dk_parts = q.new_empty(2, blocks, batch, T, heads, key_width)
    dbeta_parts, dcum_parts = q.new_empty(2, blocks, batch, T, heads)
    d_initial = torch.empty(batch, heads, key_width, value_width, dtype=torch.float32, device=v.device)
    _chunked_backward[(batch * heads, blocks)](
        q, k, v, cum, beta, entering.contiguous(), do, d_final.float().contiguous(), dv, dq_parts, dk_parts,
        dbeta_parts, dcum_parts, d_initial, T, heads, key_width, value_width, chunks, batch * T * heads, chunk_size,
        BLOCK_K=block_k, BLOCK_V=block_v)
    # γ_i = Σ_{s<=i} g_s within the chunk: dg_s = Σ_{i>=s} dγ_i
    d_cum = dcum_parts.sum(0).view(batch, chunks, chunk_size, heads)
    dg = d_cum.flip(2).cumsum(2).flip(2).view(batch, T, heads)
    return (dq_parts.sum(0)[:, :length].contiguous(), dk_parts.sum(0)[:, :length].contiguous(),
            dv[:, :length].contiguous(), dg[:, :length].contiguous(), dbeta_parts.sum(0)[:, :length].contiguous(),
            d_initial)


@_backward_op.register_fake
def _(do, d_final, q, k, v, g, beta, entering, chunk_size):
    return (q.new_empty(q.shape, dtype=torch.float32), k.new_empty(k.shape, dtype=torch.float32),
            v.new_empty(v.shape, dtype=torch.float32), g.new_empty(g.shape, dtype=torch.float32),
            beta.new_empty(beta.shape, dtype=torch.float32), d_final.new_empty(d_final.shape, dtype=torch.float32))


def _keep_for_backward(ctx, inputs, output):
    q, k, v, g, beta, _, chunk_size, _ = inputs
    ctx.save_for_backward(q, k, v, g, beta, output[2])
    ctx.chunk_size = chunk_size


def _backward(ctx, do, d_final, _):
    q, k, v, g, beta, entering = ctx.saved_tensors
    if do is None:
        do = v.new_zeros(v.shape, dtype=torch.float32)
    if d_final is None:
        d_final = v.new_zeros(k.shape[0], k.shape[2], k.shape[3], v.shape[3], dtype=torch.float32)
    return *_backward_op(do, d_final, q, k, v, g, beta, entering, ctx.chunk_size), None, None


_forward.register_autograd(_backward, setup_context=_keep_for_backward)

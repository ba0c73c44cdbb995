"""The gated delta rule of Gated DeltaNet, twice: the chunked (WY / UT-transform) algorithm and the
exact step-by-step recurrence.

Shapes (b batch, t time, h heads, k key width, v value width):
    q, k [b, t, h, k] (k L2-normalised; q normalised and scaled by the caller)   v [b, t, h, v]
    g [b, t, h] log-decays (<= 0), or [b, t, h, k]: one per key channel (Kimi Delta Attention)
    beta [b, t, h]   state [b, h, k, v]

Recurrence per head, with α_t = exp(g_t):
    S_t = α_t S_{t-1} + β_t k_t (v_t − α_t S_{t-1}ᵀ k_t)ᵀ = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ
    o_t = S_tᵀ q_t

The chunked form splits time into chunks of Q steps. With γ the within-chunk cumulative log-decay
and Γ[i, j] = exp(γ_i − γ_j) for i >= j, the corrections the steps of a chunk write,
δ_i = β_i (v_i − S'_iᵀ k_i) (S'_i: the state just before step i writes, decayed), satisfy a unit
lower-triangular system (I + tril₋₁(diag(β) K Kᵀ ∘ Γ)) δ = β V − diag(β) (K ∘ e^γ) S₀. Its
inverse T (the UT transform) gives δ = U − W S₀ with U = T βV and W = T (βK ∘ e^γ), and then
    O = (Q ∘ e^γ) S₀ + (Q Kᵀ ∘ Γ) δ,   S_end = e^{γ_Q} S₀ + (K ∘ e^{γ_Q − γ})ᵀ δ,
both affine in the entering state S₀. So every product is batched over all chunks at once, and
only S_end = M S₀ + N, one [k, k] × [k, v] matmul a chunk, runs chunk after chunk. The gradient is
autograd's through these matmuls, except for T, whose backward is written out (two matmuls where
the solve's own would solve again and copy matrix by matrix); the tests hold it to the
recurrence's. The cumulative log-decays are differenced in float64 (in float32 they would cancel
when the decay is strong) and everything else is computed in fp32, cast back to v's dtype.
Where the chunks are a power of two of at least 16 steps and ``strata.nn.kernels`` chooses Triton
(on CUDA by default), the rule runs instead as the Triton kernels of ``delta_rule_triton``,
forward and backward (training, prefill and evaluation alike); this path is the CPU path and the
kernels' oracle.

Per-channel decays (Kimi Delta Attention, Kimi Team 2025: α_t a vector, S_{t-1} decayed row by
row, Diag(α_t) S_{t-1}) change only what depends on γ: e^γ and e^{γ_Q − γ} scale channels, the
chunk's decay is a diagonal matrix, and Γ has a value per channel, so K Kᵀ ∘ Γ and Q Kᵀ ∘ Γ become
Σ_c k_i[c] k_j[c] e^{γ_i[c] − γ_j[c]} (and with q_i). ``_channel_pairs`` computes these without an
exponent above 0: within sub-chunks of SUBCHUNK steps from the differences themselves, and across
them as a product of two decays each at most 1, through the first step of the later sub-chunk.

Packed documents: ``resets`` [b, t] marks the steps that start a new segment. They get the
log-decay −RESET_LOG_DECAY (``strata.nn.ssd``'s device): their decay is exactly 0, so no state
or within-chunk product crosses the boundary, while the float64 sums stay finite and exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from strata.nn.kernels import use_triton
from strata.nn.ssd import RESET_LOG_DECAY


class _UnitLowerInverse(torch.autograd.Function):
    """T = (I + A)⁻¹ for strictly lower-triangular A [..., Q, Q]: a triangular solve forward and
    dA = −tril₋₁(Tᵀ dT Tᵀ) backward, two matmuls (autograd's backward of the solve runs a second
    solve and copies each matrix of the batch)."""

    @staticmethod
    def forward(ctx, strictly_lower):
        size = strictly_lower.shape[-1]
        identity = torch.eye(size, dtype=strictly_lower.dtype, device=strictly_lower.device)
        inverse = torch.linalg.solve_triangular(strictly_lower + identity, identity.expand_as(strictly_lower),
                                                upper=False, unitriangular=True)
        ctx.save_for_backward(inverse)
        return inverse

    @staticmethod
    def backward(ctx, d_inverse):
        (inverse,) = ctx.saved_tensors
        transposed = inverse.transpose(-1, -2)
        return -(transposed @ d_inverse @ transposed).tril_(-1)


# Steps per sub-chunk of the per-channel pairwise decays (``_channel_pairs``).
SUBCHUNK = 8


def _reset_log_decay(g: torch.Tensor, resets: torch.Tensor | None) -> torch.Tensor:
    g = g.float()
    if resets is None:
        return g
    return g - RESET_LOG_DECAY * resets.view(*resets.shape, *(1,) * (g.dim() - 2)).float()


def _channel_pairs(lefts: tuple[torch.Tensor, ...], right: torch.Tensor, cumulative64: torch.Tensor) -> list[torch.Tensor]:
    """For each ``left``: P[i, j] = Σ_c left_i[c] right_j[c] exp(γ_i[c] − γ_j[c]) for j <= i, 0
    above; left, right [..., Q, k] fp32, cumulative64 γ [..., Q, k] (float64, non-increasing in
    i). Within a sub-chunk of S steps from the differences ([.., S, S, k], their exponentials shared
    by the lefts); across, for j before the sub-chunk starting at step r that holds i, as
    (left_i ∘ e^{γ_i − γ_r}) · (right_j ∘ e^{γ_r − γ_j}), both exponents at most 0: a matmul
    instead of a [Q, Q, k] tensor. S = 8 keeps the two parts' sizes (Q·S·k and Q·(Q/S)·k) small
    for chunks of 16 to 128 steps."""
    Q = right.shape[-2]
    S = SUBCHUNK if Q % SUBCHUNK == 0 else Q
    M = Q // S
    subchunks = cumulative64.unflatten(-2, (M, S))  # [..., M, S, k]
    inside = torch.ones(S, S, dtype=torch.bool, device=right.device).tril()
    differences = (subchunks[..., :, None, :] - subchunks[..., None, :, :]).float()  # [..., M, S, S, k]
    decays = torch.exp(differences.masked_fill(~inside[..., None], float("-inf")))
    right_by_decay = right.unflatten(-2, (M, S))[..., None, :, :] * decays  # [..., M, S(i), S(j), k]
    same_subchunk = torch.eye(M, dtype=right.dtype, device=right.device)[:, None, :, None]  # [M, 1, M, 1]
    if M > 1:
        reference = subchunks[..., :, :1, :]  # γ_r [..., M, 1, k]
        towards_reference = torch.exp((subchunks - reference).float())  # e^{γ_i − γ_r} [..., M, S, k]
        before = torch.arange(Q, device=right.device)[None, :] < (torch.arange(M, device=right.device) * S)[:, None]
        exponent = (reference - cumulative64[..., None, :, :]).float()  # γ_r − γ_j [..., M, Q, k]
        right_scaled = right[..., None, :, :] * torch.exp(exponent.masked_fill(~before[..., None], float("-inf")))
    pairs = []
    for left in lefts:
        blocks = left.unflatten(-2, (M, S))  # [..., M, S, k]
        within = (blocks[..., :, None, :] * right_by_decay).sum(-1)  # [..., M, S, S]
        pair = (within[..., :, :, None, :] * same_subchunk).flatten(-2, -1).flatten(-3, -2)  # block diagonal [..., Q, Q]
        if M > 1:
            pair = pair + ((blocks * towards_reference) @ right_scaled.transpose(-1, -2)).flatten(-3, -2)
        pairs.append(pair)
    return pairs


def gated_delta_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated delta rule for training and prefill; returns (o [b, t, h, v], final state
    [b, h, k, v]). ``resets`` [b, t] (bool): steps that start a new segment. ``g`` [b, t, h, k]:
    a decay per key channel."""
    batch, length, heads, key_width = k.shape
    value_width, dtype = v.shape[-1], v.dtype
    Q, pad = chunk_size, (-length) % chunk_size
    channelwise = g.dim() == 4
    if not channelwise and _triton_applies(v, chunk_size):
        from strata.nn.delta_rule_triton import triton_gated_delta_chunked  # imports triton: only when chosen
        o, state = triton_gated_delta_chunked(q, k, v, _reset_log_decay(g, resets), beta, chunk_size, initial_state)
        return o.to(dtype).contiguous(), state
    g = _reset_log_decay(g, resets)
    q, k, v, beta = q.float(), k.float(), v.float(), beta.float()
    if pad:
        # Padded steps write nothing (β = 0) and do not decay (g = 0): the final state is unaffected.
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, 0) * (g.dim() - 2) + (0, pad)), F.pad(beta, (0, 0, 0, pad))
    chunks = (length + pad) // Q

    def per_chunk(x):  # [b, t, h, ...] -> [b, h, c, Q, ...], contiguous so matmuls batch over b, h, c at once
        return x.unflatten(1, (chunks, Q)).movedim(3, 1).contiguous()

    q, k, v, g, beta = per_chunk(q), per_chunk(k), per_chunk(v), per_chunk(g), per_chunk(beta)
    cumulative64 = g.double().cumsum(3)  # γ [b, h, c, Q], or [b, h, c, Q, k] per channel

    def per_key(decay):  # a decay [b, h, c, Q(, k)] as a factor of [b, h, c, Q, k] rows
        return decay if channelwise else decay[..., None]

    decay_in = per_key(torch.exp(cumulative64.float()))  # e^{γ_i}: from the chunk's start to step i
    decay_out = per_key(torch.exp((cumulative64.narrow(3, Q - 1, 1) - cumulative64).float()))  # e^{γ_Q − γ_i}

    k_beta = k * beta[..., None]
    # The UT transform: T = (I + tril₋₁(diag(β) K Kᵀ ∘ Γ))⁻¹, then the corrections of the values
    # (U) and of the entering state (W).
    if channelwise:
        key_pairs, scores = _channel_pairs((k_beta, q), k, cumulative64)  # [b, h, c, Q, Q] each
        T = _UnitLowerInverse.apply(key_pairs.tril(-1))
    else:
        below = torch.ones(Q, Q, dtype=torch.bool, device=k.device).tril()
        Gamma = torch.exp((cumulative64[..., :, None] - cumulative64[..., None, :]).float().masked_fill(~below, float("-inf")))
        T = _UnitLowerInverse.apply(((k_beta @ k.transpose(-1, -2)) * Gamma).tril_(-1))
        scores = (q @ k.transpose(-1, -2)) * Gamma  # [b, h, c, Q, Q]
    values = T @ (v * beta[..., None])  # U [b, h, c, Q, v]
    state_reads = T @ (k_beta * decay_in)  # W [b, h, c, Q, k]
    k_out = k * decay_out
    # The chunk's affine maps of its entering state S₀, for all chunks at once:
    # S_end = (Diag(e^{γ_Q}) − K_outᵀ W) S₀ + K_outᵀ U and O = (Q ∘ e^γ − scores W) S₀ + scores U.
    chunk_decay = decay_in[..., -1:, :]  # e^{γ_Q} [b, h, c, 1, 1 or k]: I times it is Diag(e^{γ_Q})
    identity = torch.eye(key_width, device=k.device)
    transition = identity * chunk_decay - k_out.transpose(-1, -2) @ state_reads  # [b, h, c, k, k]
    written = k_out.transpose(-1, -2) @ values  # [b, h, c, k, v]
    state = (initial_state.float() if initial_state is not None
             else k.new_zeros(batch, heads, key_width, value_width))
    entering = []
    # (unbind: one backward op for all chunks, where indexing would allocate a zero gradient each.)
    for chunk_transition, chunk_written in zip(transition.unbind(2), written.unbind(2), strict=True):
        entering.append(state)
        state = chunk_transition @ state + chunk_written
    reads = q * decay_in - scores @ state_reads  # [b, h, c, Q, k]
    o = reads @ torch.stack(entering, dim=2) + scores @ values
    o = o.flatten(2, 3)[:, :, :length].transpose(1, 2)  # [b, t, h, v]
    return o.to(dtype).contiguous(), state


def _triton_applies(v: torch.Tensor, chunk_size: int) -> bool:
    """The Triton kernels (``delta_rule_triton``, forward and backward) serve where
    ``strata.nn.kernels`` chooses Triton, in chunks of a power of two of at least 16 steps, with
    or without gradients; ``resets`` they take as the PyTorch path does, folded into the
    log-decays."""
    return chunk_size >= 16 and not chunk_size & (chunk_size - 1) and use_triton(v)


def gated_delta_step(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrence step: q, k [b, h, k], v [b, h, v], g [b, h] (or [b, h, k], per key
    channel), beta [b, h], state [b, h, k, v]; returns (o [b, h, v], the new fp32 state).
    ``in_place``: written over ``state`` (fp32) and returned, as ``ssd_step`` does for decoding;
    not for autograd."""
    decay = torch.exp(g.float())
    decay = decay[..., None] if g.dim() == 3 else decay[..., None, None]  # over a key channel's row, or all
    if in_place:
        if state.dtype != torch.float32:
            raise ValueError(f"gated_delta_step(in_place=True) updates an fp32 state, not {state.dtype}")
        state.mul_(decay)
    else:
        state = state.float() * decay
    k32 = k.float()
    remembered = (k32[..., None, :] @ state).squeeze(-2)  # Sᵀk [b, h, v]
    delta = beta.float()[..., None] * (v.float() - remembered)
    if in_place:
        state.addcmul_(k32[..., :, None], delta[..., None, :])
    else:
        state = state + k32[..., :, None] * delta[..., None, :]
    o = (q.float()[..., None, :] @ state).squeeze(-2)
    return o.to(v.dtype), state


def gated_delta_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the exact recurrence, one step at a time, its state zeroed before each step
    that ``resets`` marks. Same signature as ``gated_delta_chunked`` without the chunk size."""
    batch, length, heads, key_width = k.shape
    state = (initial_state.float() if initial_state is not None
             else k.new_zeros(batch, heads, key_width, v.shape[-1], dtype=torch.float32))
    outputs = []
    for t in range(length):
        if resets is not None:
            state = torch.where(resets[:, t, None, None, None], torch.zeros_like(state), state)
        o, state = gated_delta_step(state, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
        outputs.append(o)
    return torch.stack(outputs, dim=1), state

"""The SSD scan of Mamba-2, twice: the chunked algorithm and the exact step-by-step recurrence.

Shapes (b batch, t time, h heads, p head dim, g groups, n state size):
    x [b, t, h, p]   dt [b, t, h] (positive, after softplus)   A [h] (negative)
    B, C [b, t, g, n]   D [h] or None   state [b, h, p, n]

Recurrence per head:  S_t = exp(dt_t A) S_{t-1} + dt_t x_t ⊗ B_t,   y_t = S_t C_t + D x_t.

The chunked form splits time into chunks of Q steps. Inside a chunk the outputs are an
attention-like masked product ((C Bᵀ) ∘ L) X with L[l, s] = exp(a_{s+1} + ... + a_l); across chunks
only the [p, n] state travels. Its backward is written by hand (``_ChunkedScan``): autograd through
the forward would save and re-expand many [Q, Q] intermediates and split its batched matmuls into
thousands of small ones on CPU. ``ssd_recurrent`` is the reference the tests hold it to.
Everything is computed in fp32 and cast back to the input dtype. On CUDA the scan, forward and
backward, runs as Triton kernels instead (``ssd_triton``, chosen by ``strata.nn.kernels``).

Packed documents: ``resets`` [b, t] marks the steps that start a new segment, whose state must not
see the steps before them (S_t = dt_t x_t ⊗ B_t). The chunked scan gives such a step the
log-decay −RESET_LOG_DECAY: its decay is exactly 0 in floating point, while every cumulative sum
stays finite, so the differences the scan takes within a segment stay exact (in float64) and
those across a boundary are 0 after the exponential. The gradient reaching a reset step's
own decay is then 0, as it is in the recurrence, which never uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from strata.nn.kernels import use_triton

# exp(−1e4) is 0 in float32 and float64, and sums of many such steps stay far from float64's range.
RESET_LOG_DECAY = 1e4


def decay_matrix(cumulative: torch.Tensor) -> torch.Tensor:
    """[..., Q] fp64 cumulative log-decays -> fp32 [..., Q, Q], L[l, s] = exp(cum_l − cum_s) for l >= s, else 0.

    The difference is taken in float64: in float32 it would cancel catastrophically when the
    cumulative sums are large (strong decay) and their difference small.
    """
    length = cumulative.shape[-1]
    above = torch.ones(length, length, dtype=torch.bool, device=cumulative.device).triu(1)
    segments = (cumulative[..., :, None] - cumulative[..., None, :]).float()
    return torch.exp(segments.masked_fill_(above, float("-inf")))


class _ChunkedScan(torch.autograd.Function):
    """(Y, final state) of the scan over X = x·dt and log-decays a = dt·A, without the D term.

    Two layouts of X: per head [b, c, h, Q, p] for the products with the per-head decay matrix,
    and per group [b, c, g, Q, r·p] (r heads of a group side by side) for the products with B and
    C, which a group's heads share: those run as one wide matmul per group instead of r narrow
    ones, and the sums over a group's heads fall out of the matmul.
    """

    @staticmethod
    def forward(ctx, X, a, B, C, initial_state, chunk_size):
        batch, length, heads, head_dim = X.shape
        groups, state_size = B.shape[2], B.shape[3]
        per_group, Q = heads // groups, chunk_size
        pad = (-length) % Q
        if pad:
            # Zero log-decay and zero input on padded steps: the final state is unaffected.
            X, a = F.pad(X, (0, 0, 0, 0, 0, pad)), F.pad(a, (0, 0, 0, pad))
            B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
        chunks = (length + pad) // Q
        b, c, g, r, p, n = batch, chunks, groups, per_group, head_dim, state_size
        Xh = X.view(b, c, Q, heads, p).transpose(2, 3).contiguous()  # [b, c, h, Q, p]
        Xg = X.reshape(b, c, Q, g, r * p).transpose(2, 3).contiguous()  # [b, c, g, Q, r·p]
        Bg = B.reshape(b, c, Q, g, n).transpose(2, 3).contiguous()  # [b, c, g, Q, n]
        Cg = C.reshape(b, c, Q, g, n).transpose(2, 3).contiguous()
        cumulative64 = a.reshape(b, c, Q, heads).transpose(2, 3).double().cumsum(-1)  # [b, c, h, Q]
        cumulative = cumulative64.float()

        # Within chunks: Y = (L ∘ C Bᵀ) X, C Bᵀ shared by the heads of a group.
        L = decay_matrix(cumulative64)  # [b, c, h, Q, Q]
        G = Cg @ Bg.transpose(-1, -2)  # [b, c, g, Q, Q]
        M = (L.view(b, c, g, r, Q, Q) * G[:, :, :, None]).view(b, c, heads, Q, Q)
        Y = M @ Xh

        # The state each chunk adds, decayed to its end, then passed from chunk to chunk.
        to_end = torch.exp((cumulative64[..., -1:] - cumulative64).float())  # [b, c, h, Q]
        weighted = _scale_heads(Xg, to_end)  # [b, c, g, Q, r·p]
        added = (weighted.transpose(-1, -2) @ Bg).view(b, c, heads, p, n)
        chunk_decay = torch.exp(cumulative[..., -1])  # [b, c, h]
        entering = torch.empty_like(added)
        state = initial_state
        for k in range(c):
            entering[:, k] = state
            state = chunk_decay[:, k, :, None, None] * state + added[:, k]

        # The entering state's contribution at each position: exp(cum_l) C_l · S.
        from_state = Cg @ entering.view(b, c, g, r * p, n).transpose(-1, -2)  # [b, c, g, Q, r·p]
        out = _sum_in_time_layout(Y, _scale_heads(from_state, torch.exp(cumulative)))

        ctx.save_for_backward(Xh, Xg, Bg, Cg, L, G, M, cumulative, to_end, entering, from_state)
        ctx.sizes = (length, pad)
        return out[:, :length], state

    @staticmethod
    def backward(ctx, dY, d_final):
        Xh, Xg, Bg, Cg, L, G, M, cumulative, to_end, entering, from_state = ctx.saved_tensors
        length, pad = ctx.sizes
        b, c, heads, Q, p = Xh.shape
        g, n = Bg.shape[2], Bg.shape[4]
        r = heads // g
        dY = F.pad(dY, (0, 0, 0, 0, 0, pad)) if pad else dY.contiguous()
        dY_h = dY.reshape(b, c, Q, heads, p).transpose(2, 3).contiguous()  # [b, c, h, Q, p]
        dY_g = dY.reshape(b, c, Q, g, r * p).transpose(2, 3)  # [b, c, g, Q, r·p]
        if d_final is None:
            d_final = torch.zeros_like(entering[:, 0])
        entering_g = entering.view(b, c, g, r * p, n)

        # Y += exp(cum) ∘ (C Sᵀ)
        d_from_state = _scale_heads(dY_g, torch.exp(cumulative))
        dCg = d_from_state @ entering_g
        d_entering = (d_from_state.transpose(-1, -2) @ Cg).view(b, c, heads, p, n)
        d_cumulative = _per_head((d_from_state * from_state).view(b, c, g, Q, r, p).sum(-1))

        # States across chunks, last to first.
        chunk_decay = torch.exp(cumulative[..., -1])
        d_added = torch.empty_like(entering)
        d_chunk_log_decay = torch.empty_like(chunk_decay)
        running = d_final
        for k in range(c - 1, -1, -1):
            d_added[:, k] = running
            d_chunk_log_decay[:, k] = (running * entering[:, k]).sum((-1, -2)) * chunk_decay[:, k]
            running = d_entering[:, k] + chunk_decay[:, k, :, None, None] * running
        d_initial = running

        # added = (X ∘ to_end)ᵀ B, to_end = exp(cum_last − cum)
        d_added_g = d_added.view(b, c, g, r * p, n)
        d_weighted = Bg @ d_added_g.transpose(-1, -2)  # [b, c, g, Q, r·p]
        dBg = _scale_heads(Xg, to_end) @ d_added_g
        dXg = _scale_heads(d_weighted, to_end)
        d_to_end = _per_head((d_weighted * Xg).view(b, c, g, Q, r, p).sum(-1)) * to_end
        d_cumulative = d_cumulative - d_to_end
        d_chunk_log_decay = d_chunk_log_decay + d_to_end.sum(-1)

        # Y = M X with M = L ∘ G and L = exp(cum_l − cum_s) below the diagonal, so
        # d/d(cum_l − cum_s) = dM ∘ G ∘ L = dM ∘ M.
        dXh = M.transpose(-1, -2) @ dY_h
        dM = dY_h @ Xh.transpose(-1, -2)
        dG = (dM.view(b, c, g, r, Q, Q) * L.view(b, c, g, r, Q, Q)).sum(3)
        d_segments = dM * M
        d_cumulative = d_cumulative + d_segments.sum(-1) - d_segments.sum(-2)
        dCg = dCg + dG @ Bg
        dBg = dBg + dG.transpose(-1, -2) @ Cg

        d_cumulative[..., -1] += d_chunk_log_decay
        da = d_cumulative.flip(-1).cumsum(-1).flip(-1)  # [b, c, h, Q]
        return (
            _sum_in_time_layout(dXh, dXg)[:, :length],
            da.transpose(2, 3).reshape(b, c * Q, heads)[:, :length],
            dBg.transpose(2, 3).reshape(b, c * Q, g, n)[:, :length],
            dCg.transpose(2, 3).reshape(b, c * Q, g, n)[:, :length],
            d_initial,
            None,
        )


def _scale_heads(grouped: torch.Tensor, per_head: torch.Tensor) -> torch.Tensor:
    """Grouped-layout [b, c, g, Q, r·p] times a per-head, per-position value [b, c, h, Q]."""
    b, c, groups, Q, width = grouped.shape
    r = per_head.shape[2] // groups
    scale = per_head.view(b, c, groups, r, Q).transpose(-1, -2)  # [b, c, g, Q, r]
    return (grouped.view(b, c, groups, Q, r, width // r) * scale[..., None]).view(grouped.shape)


def _sum_in_time_layout(per_head: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
    """A per-head [b, c, h, Q, p] plus a grouped [b, c, g, Q, r·p] tensor, written once into the
    time-major layout [b, c·Q, h, p] of the scan's inputs and outputs."""
    b, c, heads, Q, p = per_head.shape
    groups = grouped.shape[2]
    r = heads // groups
    # Copy one part into a contiguous time-major buffer and add the other in place (an add with
    # out= would do it in one pass, but torch.compile gives that result the inputs' strides).
    out = grouped.view(b, c, groups, Q, r, p).transpose(2, 3).contiguous()
    out += per_head.view(b, c, groups, r, Q, p).permute(0, 1, 4, 2, 3, 5)
    return out.view(b, c * Q, heads, p)


def _per_head(grouped: torch.Tensor) -> torch.Tensor:
    """[b, c, g, Q, r] -> [b, c, h, Q]: the inverse of ``_grouped``."""
    b, c, groups, Q, r = grouped.shape
    return grouped.transpose(-1, -2).reshape(b, c, groups * r, Q)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan for training and prefill; returns (y [b, t, h, p], final state [b, h, p, n]).
    ``resets`` [b, t] (bool): steps that start a new segment (see the module docstring)."""
    batch, _, heads, head_dim = x.shape
    x32, dt32 = x.float(), dt.float()
    if initial_state is None:
        initial_state = torch.zeros(batch, heads, head_dim, B.shape[-1], device=x.device)
    log_decay = dt32 * A.float()
    if resets is not None:
        log_decay = log_decay - RESET_LOG_DECAY * resets[..., None].float()
    y, final_state = _scan_function(x, chunk_size)(x32 * dt32[..., None], log_decay, B.float(), C.float(), initial_state.float(), chunk_size)
    if D is not None:
        y = y + x32 * D.float()[:, None]
    return y.to(x.dtype), final_state


def linear_recurrence(x: torch.Tensor, log_decay: torch.Tensor, initial_state: torch.Tensor | None = None,
                      chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = exp(log_decay_t) h_{t−1} + x_t over x [b, t, d] and log_decay [b, t] (<= 0), from
    ``initial_state`` [b, d] (zeros by default): the chunked scan with one head of width d and a
    state of size 1. Returns (h [b, t, d], h at the end [b, d]), fp32."""
    batch, length, width = x.shape
    ones = x.new_ones(batch, length, 1, 1, dtype=torch.float32)
    initial = (torch.zeros(batch, width, device=x.device) if initial_state is None else initial_state.float())
    h, final = _scan_function(x, chunk_size)(x.float()[:, :, None], log_decay.float()[..., None], ones, ones,
                                             initial[:, None, :, None], chunk_size)
    return h[:, :, 0], final[:, 0, :, 0]


def _scan_function(x: torch.Tensor, chunk_size: int):
    """The chunked scan that runs for ``x``: the Triton kernels where ``strata.nn.kernels`` chooses
    them and they take the chunk (a power of two of at least 16 steps), else the PyTorch path."""
    if chunk_size >= 16 and not chunk_size & (chunk_size - 1) and use_triton(x):
        from strata.nn.ssd_triton import triton_chunked_scan  # imports triton: only when chosen

        return triton_chunked_scan
    return _ChunkedScan.apply


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrence step: x [b, h, p], dt [b, h], B, C [b, g, n], state [b, h, p, n]; returns
    (y [b, h, p], the new fp32 state). A group's heads share its B and C by broadcasting.

    ``in_place``: the new state is written over ``state`` (which must be fp32) and returned, for
    decoding, which keeps the state in its cache: the step then reads and writes the state once
    instead of making three new tensors of its size and copying the last back. Not for autograd,
    which needs the old state."""
    batch, heads, head_dim = x.shape
    groups, state_size = B.shape[1], B.shape[2]
    per_group = heads // groups
    dt32, x32 = dt.float(), x.float()
    decay = torch.exp(dt32 * A.float()).view(batch, groups, per_group, 1, 1)
    inputs = (dt32[..., None] * x32).view(batch, groups, per_group, head_dim, 1)
    B32 = B.float().view(batch, groups, 1, 1, state_size)
    if in_place:
        if state.dtype != torch.float32:
            raise ValueError(f"ssd_step(in_place=True) updates an fp32 state, not {state.dtype}")
        grouped = state.view(batch, groups, per_group, head_dim, state_size)
        grouped.mul_(decay).addcmul_(inputs, B32)
    else:
        grouped = state.float().view(batch, groups, per_group, head_dim, state_size) * decay + inputs * B32
    # [b, g, heads_per_group * p, n] @ [b, g, n, 1]: a batched product with no broadcast copy of the state.
    y = (grouped.view(batch, groups, per_group * head_dim, state_size) @ C.float().view(batch, groups, state_size, 1))
    y = y.view(batch, heads, head_dim)
    if D is not None:
        y = y + D.float()[:, None] * x32
    return y.to(x.dtype), grouped.view(batch, heads, head_dim, state_size)


def ssd_recurrent(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the exact recurrence, one step at a time, its state zeroed before each step
    that ``resets`` marks. Same signature as ``ssd_chunked``."""
    batch, length, heads, head_dim = x.shape
    state = (
        initial_state.float()
        if initial_state is not None
        else torch.zeros(batch, heads, head_dim, B.shape[-1], device=x.device)
    )
    outputs = []
    for t in range(length):
        if resets is not None:
            state = torch.where(resets[:, t, None, None, None], torch.zeros_like(state), state)
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        outputs.append(y)
    return torch.stack(outputs, dim=1), state

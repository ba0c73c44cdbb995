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
Everything is computed in fp32 and cast back to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decay_matrix(cumulative: torch.Tensor) -> torch.Tensor:
    """[..., Q] fp64 cumulative log-decays -> fp32 [..., Q, Q], L[l, s] = exp(cum_l − cum_s) for l >= s, else 0.

    The difference is taken in float64: in float32 it would cancel catastrophically when the
    cumulative sums are large (strong decay) and their difference small.
    """
    length = cumulative.shape[-1]
    above = torch.ones(length, length, dtype=torch.bool, device=cumulative.device).triu(1)
    segments = (cumulative[..., :, None] - cumulative[..., None, :]).float()
    return torch.exp(segments.masked_fill_(above, float("-inf")))


def _chunk_heads(tensor: torch.Tensor, chunks: int, chunk_size: int) -> torch.Tensor:
    """[b, t, h, ...] -> contiguous [b, c, h, Q, ...]."""
    batch, _, heads = tensor.shape[:3]
    chunked = tensor.reshape(batch, chunks, chunk_size, heads, *tensor.shape[3:])
    return chunked.transpose(2, 3).contiguous()


def _unchunk_heads(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """[b, c, h, Q, ...] -> [b, t, h, ...], dropping padding."""
    batch, chunks, heads, chunk_size = tensor.shape[:4]
    return tensor.transpose(2, 3).reshape(batch, chunks * chunk_size, heads, *tensor.shape[4:])[:, :length]


def _to_heads(tensor: torch.Tensor, per_group: int) -> torch.Tensor:
    """Group-shared B or C [b, c, g, Q, n] -> per head [b, c, h, Q, n]."""
    return tensor.repeat_interleave(per_group, dim=2) if per_group > 1 else tensor


class _ChunkedScan(torch.autograd.Function):
    """(Y, final state) of the scan over X = x·dt and log-decays a = dt·A, without the D term."""

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
        Xh = _chunk_heads(X, chunks, Q)  # [b, c, h, Q, p]
        a = _chunk_heads(a, chunks, Q)  # [b, c, h, Q]
        Bg, Cg = _chunk_heads(B, chunks, Q), _chunk_heads(C, chunks, Q)  # [b, c, g, Q, n]
        Bh, Ch = _to_heads(Bg, per_group), _to_heads(Cg, per_group)
        cumulative64 = a.double().cumsum(-1)
        cumulative = cumulative64.float()

        # Within chunks: Y = (L ∘ C Bᵀ) X, C Bᵀ shared by the heads of a group.
        L = decay_matrix(cumulative64)  # [b, c, h, Q, Q]
        G = Cg @ Bg.transpose(-1, -2)  # [b, c, g, Q, Q]
        M = (L.unflatten(2, (groups, per_group)) * G[:, :, :, None]).flatten(2, 3)
        Y = M @ Xh

        # The state each chunk adds, decayed to its end; then pass states from chunk to chunk.
        to_end = torch.exp((cumulative64[..., -1:] - cumulative64).float())  # [b, c, h, Q]
        added = (Xh * to_end[..., None]).transpose(-1, -2) @ Bh  # [b, c, h, p, n]
        chunk_decay = torch.exp(cumulative[..., -1])  # [b, c, h]
        entering = torch.empty_like(added)
        state = initial_state
        for k in range(chunks):
            entering[:, k] = state
            state = chunk_decay[:, k, :, None, None] * state + added[:, k]

        # The entering state's contribution at each position: exp(cum_l) C_l · S.
        from_state = Ch @ entering.transpose(-1, -2)  # [b, c, h, Q, p]
        Y = Y + torch.exp(cumulative)[..., None] * from_state

        ctx.save_for_backward(Xh, Bg, Cg, L, G, M, cumulative, to_end, entering, from_state)
        ctx.sizes = (length, groups, per_group, pad)
        return _unchunk_heads(Y, length), state

    @staticmethod
    def backward(ctx, dY, d_final):
        Xh, Bg, Cg, L, G, M, cumulative, to_end, entering, from_state = ctx.saved_tensors
        length, groups, per_group, pad = ctx.sizes
        chunks, Q = Xh.shape[1], Xh.shape[3]
        Bh, Ch = _to_heads(Bg, per_group), _to_heads(Cg, per_group)
        dY = _chunk_heads(F.pad(dY, (0, 0, 0, 0, 0, pad)) if pad else dY, chunks, Q)
        if d_final is None:
            d_final = torch.zeros_like(entering[:, 0])

        # Y += exp(cum) ∘ (Ch Sᵀ)
        d_from_state = dY * torch.exp(cumulative)[..., None]
        dCh = d_from_state @ entering
        d_entering = d_from_state.transpose(-1, -2) @ Ch
        d_cumulative = (d_from_state * from_state).sum(-1)

        # States across chunks, last to first.
        chunk_decay = torch.exp(cumulative[..., -1])
        d_added = torch.empty_like(entering)
        d_chunk_log_decay = torch.empty_like(chunk_decay)
        running = d_final
        for k in range(chunks - 1, -1, -1):
            d_added[:, k] = running
            d_chunk_log_decay[:, k] = (running * entering[:, k]).sum((-1, -2)) * chunk_decay[:, k]
            running = d_entering[:, k] + chunk_decay[:, k, :, None, None] * running
        d_initial = running

        # added = (X ∘ to_end)ᵀ Bh, to_end = exp(cum_last − cum)
        d_weighted = Bh @ d_added.transpose(-1, -2)
        dBh = (Xh * to_end[..., None]) @ d_added
        dXh = d_weighted * to_end[..., None]
        d_to_end = (d_weighted * Xh).sum(-1) * to_end
        d_cumulative = d_cumulative - d_to_end
        d_chunk_log_decay = d_chunk_log_decay + d_to_end.sum(-1)

        # Y = M X with M = L ∘ G and L = exp(cum_l − cum_s) below the diagonal, so
        # d/d(cum_l − cum_s) = dM ∘ G ∘ L = dM ∘ M.
        dXh = dXh + M.transpose(-1, -2) @ dY
        dM = dY @ Xh.transpose(-1, -2)
        dG = (dM.unflatten(2, (groups, per_group)) * L.unflatten(2, (groups, per_group))).sum(3)
        d_segments = dM * M
        d_cumulative = d_cumulative + d_segments.sum(-1) - d_segments.sum(-2)
        dCg = dG @ Bg + _from_heads(dCh, groups)
        dBg = dG.transpose(-1, -2) @ Cg + _from_heads(dBh, groups)

        d_cumulative[..., -1] += d_chunk_log_decay
        da = d_cumulative.flip(-1).cumsum(-1).flip(-1)
        return (
            _unchunk_heads(dXh, length),
            _unchunk_heads(da, length),
            _unchunk_heads(dBg, length),
            _unchunk_heads(dCg, length),
            d_initial,
            None,
        )


def _from_heads(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-head gradients [b, c, h, Q, n] summed back onto their group [b, c, g, Q, n]."""
    if tensor.shape[2] == groups:
        return tensor
    return tensor.unflatten(2, (groups, -1)).sum(3)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan for training and prefill; returns (y [b, t, h, p], final state [b, h, p, n])."""
    batch, _, heads, head_dim = x.shape
    x32, dt32 = x.float(), dt.float()
    if initial_state is None:
        initial_state = torch.zeros(batch, heads, head_dim, B.shape[-1], device=x.device)
    y, final_state = _ChunkedScan.apply(
        x32 * dt32[..., None], dt32 * A.float(), B.float(), C.float(), initial_state.float(), chunk_size
    )
    if D is not None:
        y = y + x32 * D.float()[:, None]
    return y.to(x.dtype), final_state


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrence step: x [b, h, p], dt [b, h], B, C [b, g, n], state [b, h, p, n] (fp32)."""
    heads, groups = x.shape[1], B.shape[1]
    Bh = B.float().repeat_interleave(heads // groups, dim=1)  # [b, h, n]
    Ch = C.float().repeat_interleave(heads // groups, dim=1)
    dt32 = dt.float()
    decay = torch.exp(dt32 * A.float())[..., None, None]
    state = state * decay + (dt32[..., None] * x.float())[..., None] * Bh[:, :, None, :]
    y = (state @ Ch[..., None]).squeeze(-1)
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    return y.to(x.dtype), state


def ssd_recurrent(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the exact recurrence, one step at a time. Same signature as ``ssd_chunked``."""
    batch, length, heads, head_dim = x.shape
    state = (
        initial_state.float()
        if initial_state is not None
        else torch.zeros(batch, heads, head_dim, B.shape[-1], device=x.device)
    )
    outputs = []
    for t in range(length):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        outputs.append(y)
    return torch.stack(outputs, dim=1), state

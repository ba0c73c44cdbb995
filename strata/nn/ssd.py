"""The SSD scan of Mamba-2, twice: the chunked algorithm and the exact step-by-step recurrence.

Shapes (b batch, t time, h heads, p head dim, g groups, n state size):
    x [b, t, h, p]   dt [b, t, h] (positive, after softplus)   A [h] (negative)
    B, C [b, t, g, n]   D [h] or None   state [b, h, p, n]

Recurrence per head:  S_t = exp(dt_t A) S_{t-1} + dt_t x_t ⊗ B_t,   y_t = S_t C_t + D x_t.

The chunked form splits time into chunks of Q steps: inside a chunk the outputs are an
attention-like masked product (C Bᵀ ∘ decay) x; across chunks only the [p, n] state travels.
Everything is computed in fp32 and cast back to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_sums(a: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T, T] with out[i, j] = a[j+1] + ... + a[i] for i >= j, -inf above the diagonal.

    Summing masked copies instead of subtracting two cumulative sums keeps full precision when
    the cumulative sums are large and their difference small.
    """
    length = a.shape[-1]
    lower = torch.ones(length, length, dtype=torch.bool, device=a.device).tril(-1)
    spread = a[..., None, :].expand(*a.shape, length).transpose(-1, -2).masked_fill(~lower, 0.0)
    sums = spread.cumsum(dim=-2)
    return sums.masked_fill(~lower.logical_or(torch.eye(length, dtype=torch.bool, device=a.device)), float("-inf"))


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
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    per_group = heads // groups
    out_dtype = x.dtype
    pad = (-length) % chunk_size
    x32, dt32 = x.float(), dt.float()
    B32, C32 = B.float(), C.float()
    if pad:
        # Zero dt on padded steps: no decay and no input, so the final state is unaffected.
        x32, dt32 = F.pad(x32, (0, 0, 0, 0, 0, pad)), F.pad(dt32, (0, 0, 0, pad))
        B32, C32 = F.pad(B32, (0, 0, 0, 0, 0, pad)), F.pad(C32, (0, 0, 0, 0, 0, pad))
    chunks = (length + pad) // chunk_size

    # Head-major chunked layouts: [b, h, c, Q, p] for inputs, [b, g, c, Q, n] for B and C.
    xdt = (x32 * dt32[..., None]).permute(0, 2, 1, 3).reshape(batch, heads, chunks, chunk_size, head_dim)
    log_decay = (dt32 * A.float()).permute(0, 2, 1).reshape(batch, heads, chunks, chunk_size)
    Bc = B32.permute(0, 2, 1, 3).reshape(batch, groups, chunks, chunk_size, state_size)
    Cc = C32.permute(0, 2, 1, 3).reshape(batch, groups, chunks, chunk_size, state_size)
    cumulative = log_decay.cumsum(dim=-1)

    def by_group(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unflatten(1, (groups, per_group))

    # 1. Within chunks: y = (C Bᵀ ∘ decay(l <- s)) (x dt).
    scores = Cc @ Bc.transpose(-1, -2)  # [b, g, c, Q, Q]
    decay = torch.exp(segment_sums(log_decay))  # [b, h, c, Q, Q]
    y = ((by_group(decay) * scores[:, :, None]).flatten(1, 2)) @ xdt

    # 2. The state each chunk adds, decayed to the chunk's end: [b, h, c, p, n].
    to_end = torch.exp(cumulative[..., -1:] - cumulative)
    chunk_states = by_group((xdt * to_end[..., None]).transpose(-1, -2)) @ Bc[:, :, None]
    chunk_states = chunk_states.flatten(1, 2)

    # 3. Pass states across chunks: the state entering chunk c, plus the final state.
    if initial_state is None:
        initial_state = torch.zeros(batch, heads, head_dim, state_size, device=x.device)
    states = torch.cat([initial_state.float()[:, :, None], chunk_states], dim=2)  # [b, h, c+1, p, n]
    chunk_decay = torch.exp(segment_sums(F.pad(cumulative[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    states = (chunk_decay @ states.flatten(-2)).unflatten(-1, (head_dim, state_size))
    entering, final_state = states[:, :, :-1], states[:, :, -1]

    # 4. Contribution of the entering state to each position: exp(cum) * C · S.
    from_state = by_group(entering) @ Cc[:, :, None].transpose(-1, -2)  # [b, g, hg, c, p, Q]
    y = y + from_state.flatten(1, 2).transpose(-1, -2) * torch.exp(cumulative)[..., None]

    y = y.reshape(batch, heads, chunks * chunk_size, head_dim)[:, :, :length].transpose(1, 2)
    if D is not None:
        y = y + x.float() * D.float()[:, None]
    return y.to(out_dtype), final_state


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

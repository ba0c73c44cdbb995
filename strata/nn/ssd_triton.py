"""The SSD scan's forward pass (``strata.nn.ssd``) as Triton kernels: prefill and evaluation on a
GPU, where no gradient is needed. Training keeps the PyTorch path and its hand-written backward
until the backward kernels exist (issue 26).

The decomposition is the chunked one of ``ssd.py``, with the [Q, Q] matrices never stored:
  1. ``_chunk_states``: each chunk's own state, Σ_s exp(cum_last − cum_s) X_s ⊗ B_s  [p, n],
     one program per (row and chunk, head, block of p);
  2. the states passed from chunk to chunk (a short loop over chunks in PyTorch: [b, h, p, n]
     multiply-adds, c of them);
  3. ``_chunk_outputs``: per block of BLOCK_M steps, exp(cum_l) C_l · S_entering plus the causal
     Σ_s (C_l · B_s) exp(cum_l − cum_s) X_s over the chunk's earlier blocks, flash-attention
     style, in fp32.
The cumulative log-decays are summed per chunk in float64 by PyTorch and their differences taken
in float64 in the kernels, as the PyTorch path takes them (strong decays cancel in float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Products in full fp32 ("ieee"), as the PyTorch path computes them; on a GPU tf32 or bf16 inputs
# would be faster, at a precision the tests (1e-4) do not allow. A choice for measuring there.
PRECISION: tl.constexpr = tl.constexpr("ieee")


@triton.jit
def _chunk_states(X, B, cum, states, T, H, G: tl.constexpr, P, N, Q: tl.constexpr, CHUNKS,
                  BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr):
    row_chunk, head, tile_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row, chunk = row_chunk // CHUNKS, row_chunk % CHUNKS
    group = head // (H // G)
    p = tile_p * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    start = row.to(tl.int64) * T + chunk * Q
    last = tl.load(cum + (start + Q - 1) * H + head)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for offset in tl.static_range(0, Q, BLOCK_Q):
        s = offset + tl.arange(0, BLOCK_Q)
        to_end = tl.exp((last - tl.load(cum + (start + s) * H + head)).to(tl.float32))
        x = tl.load(X + ((start + s) * H + head)[:, None] * P + p[None, :], mask=p[None, :] < P, other=0.0)
        b = tl.load(B + ((start + s) * G + group)[:, None] * N + n[None, :], mask=n[None, :] < N, other=0.0)
        acc += tl.dot(tl.trans(x * to_end[:, None]), b, input_precision=PRECISION)
    out = ((row_chunk.to(tl.int64) * H + head) * P + p)[:, None] * N + n[None, :]
    tl.store(states + out, acc, mask=(p[:, None] < P) & (n[None, :] < N))


@triton.jit
def _chunk_outputs(X, B, C, cum, entering, Y, T, H, G: tl.constexpr, P, N, Q: tl.constexpr, CHUNKS,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    row_chunk, head, tile_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row, chunk = row_chunk // CHUNKS, row_chunk % CHUNKS
    group = head // (H // G)
    m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p, n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    start = row.to(tl.int64) * T + chunk * Q
    cum_m = tl.load(cum + (start + m) * H + head)
    c = tl.load(C + ((start + m) * G + group)[:, None] * N + n[None, :], mask=n[None, :] < N, other=0.0)
    # the state entering the chunk, read at each step with that step's decay since the chunk began
    state = tl.load(entering + ((row_chunk.to(tl.int64) * H + head) * P + p)[None, :] * N + n[:, None],
                    mask=(p[None, :] < P) & (n[:, None] < N), other=0.0)  # [n, p]
    acc = tl.dot(c, state, input_precision=PRECISION) * tl.exp(cum_m.to(tl.float32))[:, None]
    for offset in tl.range(0, (tile_m + 1) * BLOCK_M, BLOCK_K):
        s = offset + tl.arange(0, BLOCK_K)
        cum_s = tl.load(cum + (start + s) * H + head)
        b = tl.load(B + ((start + s) * G + group)[:, None] * N + n[None, :], mask=n[None, :] < N, other=0.0)
        decay = tl.exp((cum_m[:, None] - cum_s[None, :]).to(tl.float32))
        weights = tl.where(s[None, :] <= m[:, None], tl.dot(c, tl.trans(b), input_precision=PRECISION) * decay, 0.0)
        x = tl.load(X + ((start + s) * H + head)[:, None] * P + p[None, :], mask=p[None, :] < P, other=0.0)
        acc += tl.dot(weights, x, input_precision=PRECISION)
    tl.store(Y + ((start + m) * H + head)[:, None] * P + p[None, :], acc, mask=p[None, :] < P)


def triton_chunked_scan(X: torch.Tensor, a: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        initial_state: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, final state) of the scan over X = x·dt [b, t, h, p] and log-decays a [b, t, h], fp32,
    without the D term: ``ssd._ChunkedScan``'s forward."""
    batch, length, heads, head_dim = X.shape
    groups, state_size = B.shape[2], B.shape[3]
    Q = chunk_size
    if Q < 16 or Q & (Q - 1):
        raise ValueError(f"the Triton SSD scan takes chunks of a power of two of at least 16 steps, got {Q}")
    pad = (-length) % Q
    if pad:  # zero log-decay and zero input on padded steps: the final state is unaffected
        X, a = F.pad(X, (0, 0, 0, 0, 0, pad)), F.pad(a, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
    T, chunks = length + pad, (length + pad) // Q
    X, B, C = X.float().contiguous(), B.float().contiguous(), C.float().contiguous()
    cum = a.double().view(batch, chunks, Q, heads).cumsum(2).view(batch, T, heads).contiguous()
    block_p = max(16, triton.next_power_of_2(head_dim))
    block_n = max(16, triton.next_power_of_2(state_size))
    added = torch.empty(batch, chunks, heads, head_dim, state_size, dtype=torch.float32, device=X.device)
    _chunk_states[(batch * chunks, heads, triton.cdiv(head_dim, min(block_p, 64)))](
        X, B, cum, added, T, heads, groups, head_dim, state_size, Q, chunks,
        BLOCK_P=min(block_p, 64), BLOCK_N=block_n, BLOCK_Q=min(Q, 64))
    chunk_decay = torch.exp(cum.view(batch, chunks, Q, heads)[:, :, -1].float())  # [b, c, h]
    entering = torch.empty_like(added)
    state = initial_state.float()
    for k in range(chunks):
        entering[:, k] = state
        state = chunk_decay[:, k, :, None, None] * state + added[:, k]
    Y = torch.empty_like(X)
    block_m = min(Q, 64)
    _chunk_outputs[(batch * chunks, heads, Q // block_m)](
        X, B, C, cum, entering, Y, T, heads, groups, head_dim, state_size, Q, chunks,
        BLOCK_M=block_m, BLOCK_K=block_m, BLOCK_P=block_p, BLOCK_N=block_n)
    return Y[:, :length], state

"""The SSD scan (``strata.nn.ssd``) as Triton kernels, forward and backward, with segment resets
and initial and final states: ``ssd_chunked`` runs it on CUDA (chosen by ``strata.nn.kernels``);
the PyTorch path stays the CPU path and the tests' oracle.

The decomposition is the chunked one of ``ssd.py``, with the [Q, Q] matrices never stored: each
program rebuilds its tiles of C Bᵀ and of the decays from the inputs, flash-attention style.
With cum the within-chunk cumulative log-decay, last its value at the chunk's end, S the state
entering a chunk:

  forward
    1. ``_chunk_states``: each chunk's own state, Σ_s exp(last − cum_s) X_s ⊗ B_s  [p, n];
    2. the states passed from chunk to chunk (a short loop over chunks in PyTorch: [b, h, p, n]
       multiply-adds, c of them);
    3. ``_chunk_outputs``: Y_l = exp(cum_l) S C_l + Σ_{s<=l} (C_l · B_s) exp(cum_l − cum_s) X_s;
  backward (dY given; dM[l, s] = dY_l · X_s is the gradient of the product's weights)
    1. ``_chunk_states`` again, weighted from the chunk's start: Σ_l exp(cum_l) dY_l ⊗ C_l, the
       gradient of the entering state; then in PyTorch the states' gradients from the last chunk
       to the first: of each chunk's own state, of its decay, and of the initial state;
    2. ``_source_gradients``, per block of source steps s (looping over the later steps l):
       dX_s, a head's share of dB_s and −Σ_l of dM ∘ M, the part of d cum that s takes as a source;
    3. ``_target_gradients``, per block of target steps l (looping over the earlier steps s):
       a head's share of dC_l and the part of d cum that l takes as a target, incl. exp(cum_l)'s;
    4. in PyTorch: the heads' shares of dB and dC summed over each group, and d cum turned into
       the gradient of the log-decays (a reverse cumulative sum within each chunk).
The cumulative log-decays are summed per chunk in float64 by PyTorch and their differences taken
in float64 in the kernels, as the PyTorch path takes them: strong decays cancel in float32, and
a reset's log-decay of −RESET_LOG_DECAY must stay exact for its exponential to be 0.
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
def _decay(cum_l, cum_s, causal):
    """[l, s] exp(cum_l − cum_s) where ``causal`` (l >= s), else 0: the difference in float64, and
    −inf off the causal part, whose exponential would overflow where a reset lies between."""
    return tl.exp(tl.where(causal, cum_l[:, None] - cum_s[None, :], float("-inf")).to(tl.float32))


@triton.jit
def _chunk_states(X, B, cum, states, T, H, G: tl.constexpr, P, N, Q: tl.constexpr, CHUNKS,
                  FROM_START: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr):
    """states[row, chunk, head] = Σ_s w_s X_s ⊗ B_s over the chunk's steps, X per head [.., H, P], B
    per group [.., G, N]; w_s = exp(cum_s) when FROM_START, else exp(last − cum_s)."""
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
        cum_s = tl.load(cum + (start + s) * H + head)
        weight = tl.exp(cum_s.to(tl.float32)) if FROM_START else tl.exp((last - cum_s).to(tl.float32))
        x = tl.load(X + ((start + s) * H + head)[:, None] * P + p[None, :], mask=p[None, :] < P, other=0.0)
        b = tl.load(B + ((start + s) * G + group)[:, None] * N + n[None, :], mask=n[None, :] < N, other=0.0)
        acc += tl.dot(tl.trans(x * weight[:, None]), b, input_precision=PRECISION)
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
        decay = _decay(cum_m, cum_s, s[None, :] <= m[:, None])
        weights = tl.dot(c, tl.trans(b), input_precision=PRECISION) * decay
        x = tl.load(X + ((start + s) * H + head)[:, None] * P + p[None, :], mask=p[None, :] < P, other=0.0)
        acc += tl.dot(weights, x, input_precision=PRECISION)
    tl.store(Y + ((start + m) * H + head)[:, None] * P + p[None, :], acc, mask=p[None, :] < P)


@triton.jit
def _source_gradients(X, B, C, cum, dY, d_added, dX, dB_heads, d_cum, d_to_end, T, H, G: tl.constexpr, P, N,
                      Q: tl.constexpr, CHUNKS, BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    row_chunk, head, tile_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row, chunk = row_chunk // CHUNKS, row_chunk % CHUNKS
    group = head // (H // G)
    s = tile_s * BLOCK_S + tl.arange(0, BLOCK_S)
    p, n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    p_ok, n_ok = p[None, :] < P, n[None, :] < N
    start = row.to(tl.int64) * T + chunk * Q
    last = tl.load(cum + (start + Q - 1) * H + head)
    cum_s = tl.load(cum + (start + s) * H + head)
    x = tl.load(X + ((start + s) * H + head)[:, None] * P + p[None, :], mask=p_ok, other=0.0)
    b = tl.load(B + ((start + s) * G + group)[:, None] * N + n[None, :], mask=n_ok, other=0.0)
    # The chunk's own state, Σ_s exp(last − cum_s) X_s ⊗ B_s, reached the later chunks.
    added = tl.load(d_added + ((row_chunk.to(tl.int64) * H + head) * P + p)[:, None] * N + n[None, :],
                    mask=(p[:, None] < P) & n_ok, other=0.0)  # [p, n]
    to_end = tl.exp((last - cum_s).to(tl.float32))
    dx = tl.dot(b, tl.trans(added), input_precision=PRECISION) * to_end[:, None]
    db = tl.dot(x, added, input_precision=PRECISION) * to_end[:, None]
    tl.store(d_to_end + (start + s) * H + head, tl.sum(x * dx, axis=1))
    d_source = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for offset in tl.range(tile_s * BLOCK_S, Q, BLOCK_L):
        l = offset + tl.arange(0, BLOCK_L)
        cum_l = tl.load(cum + (start + l) * H + head)
        c = tl.load(C + ((start + l) * G + group)[:, None] * N + n[None, :], mask=n_ok, other=0.0)
        dy = tl.load(dY + ((start + l) * H + head)[:, None] * P + p[None, :], mask=p_ok, other=0.0)
        decay = _decay(cum_l, cum_s, l[:, None] >= s[None, :])
        cb = tl.dot(c, tl.trans(b), input_precision=PRECISION)
        dx += tl.dot(tl.trans(cb * decay), dy, input_precision=PRECISION)
        dm_decay = tl.dot(dy, tl.trans(x), input_precision=PRECISION) * decay
        db += tl.dot(tl.trans(dm_decay), c, input_precision=PRECISION)
        d_source += tl.sum(dm_decay * cb, axis=0)
    tl.store(dX + ((start + s) * H + head)[:, None] * P + p[None, :], dx, mask=p_ok)
    tl.store(dB_heads + ((start + s) * H + head)[:, None] * N + n[None, :], db, mask=n_ok)
    tl.store(d_cum + (start + s) * H + head, -d_source)


@triton.jit
def _target_gradients(X, B, C, cum, dY, entering, dC_heads, d_cum, T, H, G: tl.constexpr, P, N,
                      Q: tl.constexpr, CHUNKS, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    row_chunk, head, tile_l = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row, chunk = row_chunk // CHUNKS, row_chunk % CHUNKS
    group = head // (H // G)
    l = tile_l * BLOCK_L + tl.arange(0, BLOCK_L)
    p, n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    p_ok, n_ok = p[None, :] < P, n[None, :] < N
    start = row.to(tl.int64) * T + chunk * Q
    cum_l = tl.load(cum + (start + l) * H + head)
    c = tl.load(C + ((start + l) * G + group)[:, None] * N + n[None, :], mask=n_ok, other=0.0)
    dy = tl.load(dY + ((start + l) * H + head)[:, None] * P + p[None, :], mask=p_ok, other=0.0)
    state = tl.load(entering + ((row_chunk.to(tl.int64) * H + head) * P + p)[:, None] * N + n[None, :],
                    mask=(p[:, None] < P) & n_ok, other=0.0)  # [p, n]
    # Y_l += exp(cum_l) S C_l
    dc = tl.dot(dy, state, input_precision=PRECISION) * tl.exp(cum_l.to(tl.float32))[:, None]
    d_target = tl.sum(dc * c, axis=1)
    for offset in tl.range(0, (tile_l + 1) * BLOCK_L, BLOCK_S):
        s = offset + tl.arange(0, BLOCK_S)
        cum_s = tl.load(cum + (start + s) * H + head)
        b = tl.load(B + ((start + s) * G + group)[:, None] * N + n[None, :], mask=n_ok, other=0.0)
        x = tl.load(X + ((start + s) * H + head)[:, None] * P + p[None, :], mask=p_ok, other=0.0)
        decay = _decay(cum_l, cum_s, l[:, None] >= s[None, :])
        dm_decay = tl.dot(dy, tl.trans(x), input_precision=PRECISION) * decay
        dc += tl.dot(dm_decay, b, input_precision=PRECISION)
        d_target += tl.sum(dm_decay * tl.dot(c, tl.trans(b), input_precision=PRECISION), axis=1)
    tl.store(dC_heads + ((start + l) * H + head)[:, None] * N + n[None, :], dc, mask=n_ok)
    tl.store(d_cum + (start + l) * H + head, d_target)


# The scan is a pair of custom operators (forward and backward), so torch.compile keeps them
# whole in its graph (a compiled block calls the kernels without a graph break) and autograd
# pairs them through ``register_autograd``.
@torch.library.custom_op("strata::ssd_scan", mutates_args=())
def _scan(X: torch.Tensor, a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, initial_state: torch.Tensor,
          chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Y, final state, the state entering each chunk [b, c, h, p, n], kept for the backward)."""
    shape, (X, a, B, C) = _Shape.padded(X, a, B, C, chunk_size)
    cum = shape.cumulative(a)
    added = shape.chunk_states(X, B, cum, from_start=False)
    chunk_decay = shape.chunk_decay(cum)
    entering = torch.empty_like(added)
    state = initial_state.float()
    for k in range(shape.chunks):
        entering[:, k] = state
        state = chunk_decay[:, k, :, None, None] * state + added[:, k]
    Y = torch.empty_like(X)
    _chunk_outputs[shape.grid()](
        X, B, C, cum, entering, Y, *shape.arguments,
        BLOCK_M=shape.block_q, BLOCK_K=shape.block_q, BLOCK_P=shape.block_p, BLOCK_N=shape.block_n)
    return Y[:, :shape.length].contiguous(), state, entering


@_scan.register_fake
def _(X, a, B, C, initial_state, chunk_size):
    batch, length, heads, head_dim = X.shape
    chunks = -(-length // chunk_size)
    return (X.new_empty(X.shape, dtype=torch.float32), initial_state.new_empty(initial_state.shape, dtype=torch.float32),
            X.new_empty(batch, chunks, heads, head_dim, B.shape[-1], dtype=torch.float32))


@torch.library.custom_op("strata::ssd_scan_backward", mutates_args=())
def _scan_backward(dY: torch.Tensor, d_final: torch.Tensor, X: torch.Tensor, a: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, entering: torch.Tensor, chunk_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of X, a, B, C and the initial state."""
    shape, (X, a, B, C, dY) = _Shape.padded(X, a, B, C, chunk_size, dY)
    cum = shape.cumulative(a)
    chunk_decay = shape.chunk_decay(cum)
    b, T, heads, groups, Q, chunks = shape.batch, shape.T, shape.heads, shape.groups, shape.Q, shape.chunks
    d_entering = shape.chunk_states(dY, C, cum, from_start=True)
    # The states, last chunk to first: S_{k+1} = decay_k S_k + added_k.
    d_added = torch.empty_like(entering)
    d_chunk_log_decay = torch.empty_like(chunk_decay)
    running = d_final.float()
    for k in range(chunks - 1, -1, -1):
        d_added[:, k] = running
        d_chunk_log_decay[:, k] = (running * entering[:, k]).sum((-1, -2)) * chunk_decay[:, k]
        running = d_entering[:, k] + chunk_decay[:, k, :, None, None] * running

    dX = torch.empty_like(X)
    per_step = X.new_empty(3, b, T, heads)  # d cum as source, as target, and d to_end
    dB_heads, dC_heads = X.new_empty(2, b, T, heads, shape.state_size)
    blocks = dict(BLOCK_P=shape.block_p, BLOCK_N=shape.block_n)
    _source_gradients[shape.grid()](X, B, C, cum, dY, d_added, dX, dB_heads, per_step[0], per_step[2],
                                    *shape.arguments, BLOCK_S=shape.block_q, BLOCK_L=shape.block_q, **blocks)
    _target_gradients[shape.grid()](X, B, C, cum, dY, entering, dC_heads, per_step[1],
                                    *shape.arguments, BLOCK_L=shape.block_q, BLOCK_S=shape.block_q, **blocks)
    # to_end_s = exp(last − cum_s): −d_to_end at s, +Σ d_to_end at the chunk's last step.
    d_source, d_target, d_to_end = per_step
    d_cum = (d_source + d_target - d_to_end).view(b, chunks, Q, heads)
    d_cum[:, :, -1] += d_chunk_log_decay + d_to_end.view(b, chunks, Q, heads).sum(2)
    da = d_cum.flip(2).cumsum(2).flip(2).view(b, T, heads)

    def per_group(per_head):  # [b, T, h, n] -> [b, length, g, n]
        return per_head.view(b, T, groups, heads // groups, -1).sum(3)[:, :shape.length]

    length = shape.length
    return dX[:, :length].contiguous(), da[:, :length].contiguous(), per_group(dB_heads), per_group(dC_heads), running


@_scan_backward.register_fake
def _(dY, d_final, X, a, B, C, entering, chunk_size):
    return (X.new_empty(X.shape), a.new_empty(a.shape), B.new_empty(B.shape), C.new_empty(C.shape),
            d_final.new_empty(d_final.shape))


def _keep_for_backward(ctx, inputs, output):
    X, a, B, C, _, chunk_size = inputs
    ctx.save_for_backward(X, a, B, C, output[2])
    ctx.chunk_size = chunk_size


def _backward(ctx, dY, d_final, _):
    X, a, B, C, entering = ctx.saved_tensors
    if d_final is None:
        d_final = entering.new_zeros(entering[:, 0].shape)
    if dY is None:
        dY = X.new_zeros(X.shape)
    return *_scan_backward(dY, d_final, X, a, B, C, entering, ctx.chunk_size), None


_scan.register_autograd(_backward, setup_context=_keep_for_backward)


def triton_chunked_scan(X: torch.Tensor, a: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        initial_state: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, final state) of the scan over X = x·dt [b, t, h, p] and log-decays a [b, t, h], fp32,
    without the D term: ``ssd._ChunkedScan`` with the same arguments, as Triton kernels."""
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"the Triton SSD scan takes chunks of a power of two of at least 16 steps, got {chunk_size}")
    Y, state, _ = _scan(X.float(), a.float(), B.float(), C.float(), initial_state.float(), chunk_size)
    return Y, state


class _Shape:
    """The sizes the kernels take, their tile sizes and launch grids."""

    def __init__(self, batch, length, heads, groups, head_dim, state_size, Q):
        self.batch, self.length, self.heads, self.groups, self.Q = batch, length, heads, groups, Q
        self.T = length + (-length) % Q
        self.chunks = self.T // Q
        self.head_dim, self.state_size = head_dim, state_size
        self.block_p = max(16, triton.next_power_of_2(head_dim))
        self.block_n = max(16, triton.next_power_of_2(state_size))
        self.block_q = min(Q, 64)
        self.arguments = (self.T, heads, groups, head_dim, state_size, Q, self.chunks)

    @classmethod
    def padded(cls, X, a, B, C, chunk_size, *per_head):
        """The shape and the inputs (and more per-head tensors like X) in fp32, contiguous, padded to
        whole chunks: zero log-decay and zero input on padded steps leave the final state as it is."""
        batch, length, heads, head_dim = X.shape
        shape = cls(batch, length, heads, B.shape[2], head_dim, B.shape[3], chunk_size)
        pad = shape.T - length
        tensors = [F.pad(x.float(), (0, 0) * (x.dim() - 2) + (0, pad)).contiguous() for x in (X, a, B, C, *per_head)]
        return shape, tensors

    def cumulative(self, a: torch.Tensor) -> torch.Tensor:
        """The within-chunk cumulative sums of the log-decays [b, T, h], in float64."""
        return a.double().view(self.batch, self.chunks, self.Q, self.heads).cumsum(2).view(a.shape).contiguous()

    def chunk_decay(self, cum: torch.Tensor) -> torch.Tensor:
        """Each chunk's whole decay [b, c, h]."""
        return torch.exp(cum.view(self.batch, self.chunks, self.Q, self.heads)[:, :, -1].float())

    def grid(self) -> tuple[int, int, int]:
        """One program per (row and chunk, head, block of the chunk's steps)."""
        return self.batch * self.chunks, self.heads, self.Q // self.block_q

    def chunk_states(self, X, B, cum, from_start: bool) -> torch.Tensor:
        block_p = min(self.block_p, 64)
        states = X.new_empty(self.batch, self.chunks, self.heads, self.head_dim, self.state_size)
        _chunk_states[(self.batch * self.chunks, self.heads, triton.cdiv(self.head_dim, block_p))](
            X, B, cum, states, *self.arguments, FROM_START=from_start,
            BLOCK_P=block_p, BLOCK_N=self.block_n, BLOCK_Q=self.block_q)
        return states

"""The causal depthwise convolution (``strata.nn.conv``) as Triton kernels, forward and backward,
with segment ids; chosen by ``strata.nn.kernels`` (on CUDA by default), held to the PyTorch path
by tests under Triton's interpreter.

Layout [B, T, C] as the projections produce it. Each program takes a tile of BLOCK_T steps ×
BLOCK_C channels of one row and accumulates in fp32:
  forward   y_t  = bias + Σ_k w_k ∘ x_{t−K+1+k}
  backward  dx_s = Σ_k w_k ∘ dy_{s+K−1−k}      (the outputs that read x_s)
            dw_k = Σ_t dy_t ∘ x_{t−K+1+k},  db = Σ_t dy_t
where, with segment ids, an input counts only for outputs of its own segment. The weight and
bias gradients are summed per tile into a buffer and over tiles by PyTorch, so they come out the
same on every run (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T, BLOCK_C = 32, 32


@triton.jit
def _forward(x, w, bias, seg, y, T, C, K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEG: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    row, tile_t, tile_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = tile_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok, c_ok = t < T, c < C
    base = row.to(tl.int64) * T
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SEG:
        own = tl.load(seg + base + t, mask=t_ok, other=-1)
    for k in tl.static_range(K):
        source = t - (K - 1) + k
        ok = t_ok & (source >= 0)
        if HAS_SEG:
            ok = ok & (tl.load(seg + base + source, mask=ok, other=-2) == own)
        inputs = tl.load(x + (base + source)[:, None] * C + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
        tap = tl.load(w + c * K + k, mask=c_ok, other=0.0).to(tl.float32)
        acc += inputs.to(tl.float32) * tap[None, :]
    tl.store(y + (base + t)[:, None] * C + c[None, :], acc.to(y.dtype.element_ty), mask=t_ok[:, None] & c_ok[None, :])


@triton.jit
def _backward(x, w, seg, dy, dx, dw_tiles, db_tiles, T, C, TILES_T, K: tl.constexpr, HAS_SEG: tl.constexpr,
              BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    row, tile_t, tile_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    s = tile_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)
    s_ok, c_ok = s < T, c < C
    base = row.to(tl.int64) * T
    if HAS_SEG:
        own = tl.load(seg + base + s, mask=s_ok, other=-1)
    # dx at the tile's steps s, from the outputs s .. s+K-1 that read them
    d_inputs = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(K):
        output = s + (K - 1) - k
        ok = s_ok & (output < T)
        if HAS_SEG:
            ok = ok & (tl.load(seg + base + output, mask=ok, other=-2) == own)
        grads = tl.load(dy + (base + output)[:, None] * C + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
        tap = tl.load(w + c * K + k, mask=c_ok, other=0.0).to(tl.float32)
        d_inputs += grads.to(tl.float32) * tap[None, :]
    tl.store(dx + (base + s)[:, None] * C + c[None, :], d_inputs.to(dx.dtype.element_ty), mask=s_ok[:, None] & c_ok[None, :])
    # this tile's share of dw and db: its steps as outputs
    grads = tl.load(dy + (base + s)[:, None] * C + c[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    tile = row * TILES_T + tile_t
    tl.store(db_tiles + tile * C + c, tl.sum(grads, axis=0), mask=c_ok)
    for k in tl.static_range(K):
        source = s - (K - 1) + k
        ok = s_ok & (source >= 0)
        if HAS_SEG:
            ok = ok & (tl.load(seg + base + source, mask=ok, other=-2) == own)
        inputs = tl.load(x + (base + source)[:, None] * C + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
        tl.store(dw_tiles + (tile * C + c) * K + k, tl.sum(grads * inputs.to(tl.float32), axis=0), mask=c_ok)


# A pair of custom operators (forward and backward), so torch.compile keeps the kernels whole in
# its graph and autograd pairs them through ``register_autograd``.
@torch.library.custom_op("strata::causal_conv1d", mutates_args=())
def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
          segment_ids: torch.Tensor | None) -> torch.Tensor:
    x, weight = x.contiguous(), weight.contiguous()
    batch, length, channels = x.shape
    y = torch.empty_like(x)
    grid = (batch, triton.cdiv(length, BLOCK_T), triton.cdiv(channels, BLOCK_C))
    _forward[grid](x, weight, bias if bias is not None else weight, segment_ids if segment_ids is not None else x, y,
                   length, channels, K=weight.shape[1], HAS_BIAS=bias is not None, HAS_SEG=segment_ids is not None,
                   BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
    return y


@_conv.register_fake
def _(x, weight, bias, segment_ids):
    return torch.empty_like(x)


@torch.library.custom_op("strata::causal_conv1d_backward", mutates_args=())
def _conv_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   segment_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of x, the weight and the bias (fp32)."""
    x, weight, dy = x.contiguous(), weight.contiguous(), dy.contiguous()
    batch, length, channels = x.shape
    tiles_t = triton.cdiv(length, BLOCK_T)
    dx = torch.empty_like(x)
    dw_tiles = torch.empty(batch * tiles_t, channels, weight.shape[1], dtype=torch.float32, device=x.device)
    db_tiles = torch.empty(batch * tiles_t, channels, dtype=torch.float32, device=x.device)
    grid = (batch, tiles_t, triton.cdiv(channels, BLOCK_C))
    _backward[grid](x, weight, segment_ids if segment_ids is not None else x, dy, dx, dw_tiles, db_tiles, length,
                    channels, tiles_t, K=weight.shape[1], HAS_SEG=segment_ids is not None, BLOCK_T=BLOCK_T,
                    BLOCK_C=BLOCK_C)
    return dx, dw_tiles.sum(0).to(weight.dtype), db_tiles.sum(0)


@_conv_backward.register_fake
def _(dy, x, weight, segment_ids):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0], dtype=torch.float32)


def _keep_for_backward(ctx, inputs, output):
    x, weight, bias, segment_ids = inputs
    ctx.save_for_backward(x, weight, segment_ids)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward_of_conv(ctx, dy):
    x, weight, segment_ids = ctx.saved_tensors
    dx, dw, db = _conv_backward(dy, x, weight, segment_ids)
    return dx, dw, db.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None, None


_conv.register_autograd(_backward_of_conv, setup_context=_keep_for_backward)


def triton_causal_conv1d(x, weight, bias=None, segment_ids=None):
    """``strata.nn.conv.causal_conv1d`` through the Triton kernels."""
    return _conv(x, weight, bias, segment_ids.to(torch.int32).contiguous() if segment_ids is not None else None)

"""Causal depthwise 1-D convolution over time, the short convolution of Mamba-2.

``causal_conv1d`` computes y_t = bias + Σ_k w_k ∘ x_{t−K+1+k} for x [B, T, C], weight [C, K] as K
shifted multiply-adds, with a hand-written backward of the same shape. On CPU this is several
times faster than the general depthwise ``conv1d`` (whose backward dominates), and it needs no
transposes because it works on the [B, T, C] layout the projections produce.
``causal_conv1d_reference`` is the same function through ``F.conv1d``; tests hold them equal.
On CUDA the Triton kernels of ``conv_triton`` take its place (``strata.nn.kernels``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from strata.nn.kernels import use_triton


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        length, width = x.shape[1], weight.shape[1]
        padded = F.pad(x, (0, 0, width - 1, 0))
        y = bias.expand_as(x).clone() if bias is not None else torch.zeros_like(x)
        for k in range(width):
            y.addcmul_(padded[:, k : k + length], weight[:, k])
        ctx.save_for_backward(padded, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        padded, weight = ctx.saved_tensors
        length, width = dy.shape[1], weight.shape[1]
        dy = dy.contiguous()
        d_padded = torch.zeros_like(padded)
        d_weight = torch.empty_like(weight)
        for k in range(width):
            d_padded[:, k : k + length].addcmul_(dy, weight[:, k])
            d_weight[:, k] = (dy * padded[:, k : k + length]).sum((0, 1))
        d_bias = dy.sum((0, 1)) if ctx.has_bias else None
        return d_padded[:, width - 1 :], d_weight, d_bias


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, T, C], weight [C, K], bias [C] -> [B, T, C]; output t sees inputs t−K+1 .. t, those
    of its own segment only when ``segment_ids`` [B, T] is given. On CUDA (``strata.nn.kernels``)
    the Triton kernels of ``strata.nn.conv_triton`` compute it."""
    if use_triton(x):
        from strata.nn.conv_triton import triton_causal_conv1d  # imports triton: only when chosen

        return triton_causal_conv1d(x, weight, bias, segment_ids)
    if segment_ids is not None:
        return _segmented_causal_conv1d(x, weight, bias, segment_ids)
    return _CausalConv1d.apply(x, weight, bias)


def _segmented_causal_conv1d(x, weight, bias, segment_ids):
    """The same sum of shifted products, each input zeroed where it lies in another segment than
    the output it would reach (packed documents); through autograd."""
    length, width = x.shape[1], weight.shape[1]
    y = x * weight[:, -1] + (bias if bias is not None else 0)
    for back in range(1, min(width, length)):
        same = (segment_ids[:, back:] == segment_ids[:, :-back])[..., None]
        shifted = F.pad(x[:, :-back] * same * weight[:, width - 1 - back], (0, 0, back, 0))
        y = y + shifted
    return y


def cached_causal_conv1d(held: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, weight_by_tap: torch.Tensor,
                         bias: torch.Tensor | None, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The conv of new steps x [B, T, C] continued from ``held`` [B, K, C], a decoding cache's last
    K inputs, which is updated in place (``weight_by_tap`` is weight [C, K] transposed, for the
    single-step product). ``lengths`` [B] ends rows early: a row keeps the inputs of its last
    ``lengths[b]`` real steps (trailing padding). Returns [B, T, C] in ``held``'s dtype."""
    steps, kernel = x.shape[1], held.shape[1]
    window = torch.cat([held[:, 1:], x.to(held.dtype)], dim=1)  # [B, K−1+T, C]
    if lengths is None:
        held.copy_(window[:, -kernel:])
    else:
        extended = torch.cat([held[:, :1], window], dim=1)  # [B, K+T, C]; new step s at K+s
        last = lengths[:, None] + torch.arange(kernel, device=lengths.device)  # [B, K]
        held.copy_(extended.gather(1, last[..., None].expand(-1, -1, extended.shape[2])))
    if steps == 1:
        y = (window * weight_by_tap).sum(1, keepdim=True)
        return y + bias if bias is not None else y
    return causal_conv1d(window, weight, bias)[:, kernel - 1 :]


def carried_causal_conv1d(held: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The conv of x [B, T, C] continued from ``held`` [B, K−1, C], the inputs before it (None:
    none, as at the conv's own left padding), through autograd; returns (y, the new ``held``)."""
    kernel = weight.shape[-1]
    if held is None:
        held = x.new_zeros(x.shape[0], kernel - 1, x.shape[2])
    window = torch.cat([held, x], dim=1)
    return causal_conv1d(window, weight, bias)[:, kernel - 1 :], window[:, window.shape[1] - (kernel - 1) :]


def causal_conv1d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    length, channels, width = x.shape[1], weight.shape[0], weight.shape[1]
    y = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=width - 1, groups=channels)
    return y[..., :length].transpose(1, 2)

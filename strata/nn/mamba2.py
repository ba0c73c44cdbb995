"""The Mamba-2 mixer: in-projection, causal depthwise conv, SSD scan, gated RMSNorm, out-projection."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from strata.config import Mamba2Config
from strata.nn.conv import cached_causal_conv1d, carried_causal_conv1d, causal_conv1d
from strata.nn.linear import project
from strata.nn.norms import GatedRMSNorm
from strata.nn.ssd import ssd_chunked, ssd_step


class Mamba2(nn.Module):
    """Mamba-2 with the in-projection laid out as [z, x, B, C, dt] (as mamba_ssm and HF order it).

    ``mix`` returns the gated, normalised scan output [B, T, d_ssm] before the out-projection, so
    the intra-layer hybrid can fuse it with the attention branch. ``config.norm`` says how the
    gate z meets the grouped RMSNorm (``gate_only``: no norm, no norm weight). With ``external_x`` the
    projection makes no x: the caller passes it (the hybrid's value sharing).

    With a ``cache`` (a RecurrentCache) the input holds only the new steps: the conv continues from
    the cached conv inputs and the scan from the cached state (one recurrence step for a single
    new step, the chunked scan for a prompt), and both are stored back.
    """

    def __init__(
        self,
        d_model: int,
        config: Mamba2Config,
        norm_eps: float = 1e-5,
        external_x: bool = False,
        output_projection: bool = True,
    ):
        super().__init__()
        self.d_ssm = config.width(d_model)
        self.head_dim = config.head_dim
        self.n_heads = self.d_ssm // config.head_dim
        self.n_groups = config.n_groups
        self.d_state = config.d_state
        self.chunk_size = config.chunk_size
        self.external_x = external_x
        self.conv_dim = self.d_ssm + 2 * config.n_groups * config.d_state
        x_width = 0 if external_x else self.d_ssm
        bc_width = 2 * config.n_groups * config.d_state
        # Widths of z, the conv input (x, B, C; without x when external) and dt in the projection.
        self.projection_widths = (self.d_ssm, x_width + bc_width, self.n_heads)
        self.in_proj = nn.Linear(d_model, sum(self.projection_widths), bias=config.bias)
        # An nn.Conv1d only to hold the weights under the names and shapes mamba_ssm and HF use.
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.conv_kernel, groups=self.conv_dim,
                                bias=config.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = (None if config.norm == "gate_only"
                     else GatedRMSNorm(self.d_ssm, config.n_groups, norm_eps, gate_first=config.norm == "gate_then_norm"))
        self.out_proj = nn.Linear(self.d_ssm, d_model, bias=config.bias) if output_projection else None
        # Constants on the projection's z, x, B, C, dt outputs (Falcon-H1's μP multipliers).
        multipliers = config.projection_multipliers
        self.projection_multipliers = None if multipliers is None else (
            multipliers, (self.d_ssm, x_width, bc_width // 2, bc_width // 2, self.n_heads))
        self.config = config
        self.reset_parameters()  # after every child: the order construction draws in (strata.models.init)

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """The SSM state of one sequence: heads × head width × state size."""
        return (self.n_heads, self.head_dim, self.d_state)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A ~ U[a_init_range] (the paper's [0.01, 2]); dt log-uniform in [dt_min, dt_max] stored
        through the inverse softplus in dt_bias; D = 1."""
        config, device = self.config, self.A_log.device
        low, high = config.a_init_range
        self.A_log.copy_(torch.empty(self.n_heads, device=device).uniform_(low, high).log())
        dt = torch.exp(torch.rand(self.n_heads, device=device) * (math.log(config.dt_max) - math.log(config.dt_min))
                       + math.log(config.dt_min))
        dt = dt.clamp(min=config.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.D.fill_(1.0)

    def split_projection(self, u: torch.Tensor, x: torch.Tensor | None = None):
        """(z, xBC, dt) from the block input; ``x`` [B, T, d_ssm] is required iff external_x."""
        projected = project(self.in_proj, u)
        if self.projection_multipliers is not None:
            values, widths = self.projection_multipliers
            scale = torch.tensor(values, dtype=projected.dtype, device=projected.device)
            projected = projected * scale.repeat_interleave(torch.tensor(widths, device=projected.device))
        z, xbc, dt = projected.split_with_sizes(self.projection_widths, dim=-1)
        if self.external_x:
            xbc = torch.cat([x, xbc], dim=-1)
        return z, xbc, dt

    def split_conv_output(self, xbc: torch.Tensor):
        bc = self.n_groups * self.d_state
        x, B, C = xbc.split_with_sizes([self.d_ssm, bc, bc], dim=-1)
        return (
            x.unflatten(-1, (self.n_heads, self.head_dim)),
            B.unflatten(-1, (self.n_groups, self.d_state)),
            C.unflatten(-1, (self.n_groups, self.d_state)),
        )

    def mix(self, u: torch.Tensor, x: torch.Tensor | None = None, cache=None,
            segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``segment_ids`` [B, T]: packed documents; the conv and the scan start afresh at each."""
        z, xbc, dt = self.split_projection(u, x)
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids apply to a whole-sequence forward, not to a cached one")
        if cache is None:
            conv = causal_conv1d(xbc, self.conv1d.weight[:, 0], self.conv1d.bias, segment_ids)
            xs, B, C = self.split_conv_output(F.silu(conv))
            dt = F.softplus(dt.float() + self.dt_bias.float())
            resets = None if segment_ids is None else F.pad(segment_ids[:, 1:] != segment_ids[:, :-1], (1, 0))
            y, _ = ssd_chunked(xs, dt, -torch.exp(self.A_log.float()), B, C, self.chunk_size, self.D, resets=resets)
        elif getattr(cache, "carried", False):
            y = self._carry(cache, xbc, dt)
        else:
            y = self._advance(cache, xbc, dt)
        if self.norm is None:
            return y.flatten(-2) * F.silu(z)
        return self.norm(y.flatten(-2), z)

    def step_weights(self) -> dict[str, torch.Tensor]:
        """Parameters in the form the cached path uses. A cache computes them once: weights do
        not change while it generates."""
        return {
            "A": -torch.exp(self.A_log.float()),
            "dt_bias": self.dt_bias.float(),
            "D": self.D.float(),
            "conv_weight": self.conv1d.weight[:, 0],  # [C, K]
            "conv_weight_by_tap": self.conv1d.weight[:, 0].t().contiguous(),  # [K, C]
        }

    def _carry(self, state, xbc: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """Conv and scan of the new steps continued from a carried state (``strata.models.state``),
        through autograd: the state's new tensors replace its old ones, nothing in place."""
        conv, state.conv = carried_causal_conv1d(state.conv, xbc, self.conv1d.weight[:, 0], self.conv1d.bias)
        xs, B, C = self.split_conv_output(F.silu(conv))
        dt = F.softplus(dt.float() + self.dt_bias.float())
        y, state.ssm = ssd_chunked(xs, dt, -torch.exp(self.A_log.float()), B, C, self.chunk_size, self.D,
                                   initial_state=state.ssm)
        return y

    def _advance(self, cache, xbc: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """Conv and scan of the new steps continued from ``cache``, which is updated in place."""
        weights = cache.step_weights(self)
        dt = F.softplus(dt.float() + weights["dt_bias"])
        pad = cache.sequence.pad
        if pad is not None:
            # Padded steps: a zero conv input and a zero step size leave conv window and state as
            # if the sequence began at its first real token (left padding), and the state as it
            # was after the last real one (trailing padding).
            xbc = xbc.masked_fill(pad[..., None], 0)
            dt = dt.masked_fill(pad[..., None], 0)
        conv = cached_causal_conv1d(cache.conv, xbc, weights["conv_weight"], weights["conv_weight_by_tap"],
                                    self.conv1d.bias, cache.sequence.lengths)
        steps = xbc.shape[1]
        xs, B, C = self.split_conv_output(F.silu(conv.to(xbc.dtype)))
        in_place = steps == 1 and cache.ssm.dtype == torch.float32  # no copy of the state per step
        if steps == 1:
            y, state = ssd_step(cache.ssm, xs[:, 0], dt[:, 0], weights["A"], B[:, 0], C[:, 0], weights["D"], in_place)
            y = y[:, None]
        else:
            y, state = ssd_chunked(xs, dt, weights["A"], B, C, self.chunk_size, weights["D"], initial_state=cache.ssm)
        if not in_place:
            cache.ssm.copy_(state)
        return y

    def forward(self, u: torch.Tensor, cache=None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        return project(self.out_proj, self.mix(u, cache=cache, segment_ids=segment_ids))

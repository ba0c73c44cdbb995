"""The Gated DeltaNet mixer (Yang et al., 2025), as Qwen3-Next defines it: in-projection, short
causal convs on q, k and v, L2-normalised q and k, the gated delta rule, gated per-head RMSNorm,
out-projection."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from strata.config import GatedDeltaNetConfig, KimiDeltaConfig
from strata.nn.conv import cached_causal_conv1d, carried_causal_conv1d, causal_conv1d
from strata.nn.delta_rule import gated_delta_chunked, gated_delta_step
from strata.nn.linear import project
from strata.nn.norms import HeadGatedRMSNorm, rms_norm

# Inside the square root of the L2 norm of q and k, as the reference kernels (fla, transformers) add it.
L2_NORM_EPS = 1e-6


def l2_normalized(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / sqrt(Σx² + L2_NORM_EPS) over the last dim, times ``scale`` (broadcast over x's trailing
    dims). It is an RMSNorm of weight scale/sqrt(d) and epsilon L2_NORM_EPS/d, whose fused forward
    and hand-written backward (strata.nn.norms) beat the chain of small ops autograd would record."""
    width = x.shape[-1]
    return rms_norm(x, scale * width**-0.5, L2_NORM_EPS / width)


class DeltaRuleMixer(nn.Module):
    """What Gated DeltaNet and Kimi Delta Attention (``strata.nn.kimi_delta``) share: short causal
    convs on q, k and v, the gated delta rule over a state of ``state_shape``, and the cached,
    carried and packed-document paths. A subclass lays out its in-projection (``_project``: the
    conv's input and the rest it reads, its "gates"), turns conv output and gates into the rule's
    inputs (``_rule_inputs``) and gates the rule's output (``_gated_output``).

    ``mix`` returns the gated, normalised output [B, T, n_heads · v_head_dim] before the
    out-projection (the intra-layer hybrid fuses it with another branch). ``n_heads`` counts the
    value heads: those of the state and of the output.

    With a ``cache`` (``strata.inference.cache``) the input holds only the new steps: the conv
    continues from the cached conv inputs and the rule from the cached state (one recurrence step
    for a single new step, the chunked form for a prompt), and both are stored back.
    """

    config: GatedDeltaNetConfig | KimiDeltaConfig
    n_heads: int
    head_dim: int
    v_head_dim: int
    conv_dim: int
    chunk_size: int
    conv1d: nn.Conv1d
    A_log: nn.Parameter
    dt_bias: nn.Parameter

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """The recurrent state of one sequence: value heads × key width × value width."""
        return (self.n_heads, self.head_dim, self.v_head_dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A ~ U[a_init_range] per head, stored as its log; each step softplus(a + dt_bias) (one
        dt_bias a head, or a channel) starts log-uniform in [dt_min, dt_max] (dt_bias through the
        inverse softplus), as fla, transformers and OLMo Hybrid draw them."""
        config, device = self.config, self.A_log.device
        low, high = config.a_init_range
        self.A_log.copy_(torch.empty(self.A_log.shape, device=device).uniform_(low, high).log())
        dt = torch.exp(torch.rand(self.dt_bias.shape, device=device) * (math.log(config.dt_max) - math.log(config.dt_min))
                       + math.log(config.dt_min)).clamp(min=config.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def step_weights(self) -> dict[str, torch.Tensor]:
        """Parameters in the form the cached path uses, computed once per cache."""
        return {
            "A": -torch.exp(self.A_log.float()),
            "dt_bias": self.dt_bias.float(),
            "conv_weight": self.conv1d.weight[:, 0],  # [C, K]
            "conv_weight_by_tap": self.conv1d.weight[:, 0].t().contiguous(),  # [K, C]
        }

    def _qk(self, conv: torch.Tensor, heads: int):
        """q, k [B, T, heads, head_dim] (L2-normalised, q also scaled by 1/sqrt(head_dim), each
        head repeated for its n_heads / heads value heads) and v [B, T, n_heads, v_head_dim]."""
        key_width = heads * self.head_dim
        qk, v = F.silu(conv).split_with_sizes([2 * key_width, conv.shape[-1] - 2 * key_width], dim=-1)
        # q and k normalised in one call; q also takes the 1/sqrt(head_dim) of the scores.
        scale = qk.new_tensor([self.head_dim**-0.5, 1.0], dtype=torch.float32).repeat_interleave(heads)[:, None]
        q, k = l2_normalized(qk.unflatten(-1, (2 * heads, self.head_dim)).float(), scale).split([heads, heads], dim=2)
        if self.n_heads != heads:
            repeats = self.n_heads // heads
            q, k = q.repeat_interleave(repeats, dim=2), k.repeat_interleave(repeats, dim=2)
        return q, k, v.unflatten(-1, (self.n_heads, self.v_head_dim))

    def mix(self, u: torch.Tensor, cache=None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``segment_ids`` [B, T]: packed documents; the conv and the rule start afresh at each."""
        qkv, gates = self._project(u)
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids apply to a whole-sequence forward, not to a cached one")
        if cache is None:
            conv = causal_conv1d(qkv, self.conv1d.weight[:, 0], self.conv1d.bias, segment_ids)
            q, k, v, g, beta = self._rule_inputs(conv, gates, -torch.exp(self.A_log.float()), self.dt_bias.float())
            resets = None if segment_ids is None else F.pad(segment_ids[:, 1:] != segment_ids[:, :-1], (1, 0))
            o, _ = gated_delta_chunked(q, k, v, g, beta, self.chunk_size, resets=resets)
        elif getattr(cache, "carried", False):
            conv, cache.conv = carried_causal_conv1d(cache.conv, qkv, self.conv1d.weight[:, 0], self.conv1d.bias)
            q, k, v, g, beta = self._rule_inputs(conv, gates, -torch.exp(self.A_log.float()), self.dt_bias.float())
            o, cache.ssm = gated_delta_chunked(q, k, v, g, beta, self.chunk_size, initial_state=cache.ssm)
        else:
            o = self._advance(cache, qkv, gates)
        return self._gated_output(o, gates)

    def _advance(self, cache, qkv: torch.Tensor, gates: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Conv and rule of the new steps continued from ``cache``, which is updated in place."""
        weights = cache.step_weights(self)
        pad = cache.sequence.pad
        if pad is not None:
            # Padded steps: a zero conv input, and β = 0 with no decay, leave the conv window and
            # the state as the real steps left them (left and trailing padding alike).
            qkv = qkv.masked_fill(pad[..., None], 0)
        conv = cached_causal_conv1d(cache.conv, qkv, weights["conv_weight"], weights["conv_weight_by_tap"],
                                    self.conv1d.bias, cache.sequence.lengths)
        q, k, v, g, beta = self._rule_inputs(conv.to(qkv.dtype), gates, weights["A"], weights["dt_bias"])
        if pad is not None:
            g = g.masked_fill(pad.view(*pad.shape, *(1,) * (g.dim() - 2)), 0)
            beta = beta.masked_fill(pad[..., None], 0)
        in_place = qkv.shape[1] == 1 and cache.ssm.dtype == torch.float32
        if qkv.shape[1] == 1:
            o, state = gated_delta_step(cache.ssm, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], in_place)
            o = o[:, None]
        else:
            o, state = gated_delta_chunked(q, k, v, g, beta, self.chunk_size, initial_state=cache.ssm)
        if not in_place:
            cache.ssm.copy_(state)
        return o

    def forward(self, u: torch.Tensor, cache=None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        return project(self.out_proj, self.mix(u, cache=cache, segment_ids=segment_ids))


class GatedDeltaNet(DeltaRuleMixer):
    """Gated DeltaNet with the in-projection laid out as [q, k, v, z, b, a]: the conv's input
    (q, k, v), the output gate z, β's logits b and the decay's input a (one of each per value head).
    A q/k head serves n_v_heads / n_heads consecutive value heads."""

    def __init__(self, d_model: int, config: GatedDeltaNetConfig, norm_eps: float = 1e-5,
                 output_projection: bool = True):
        super().__init__()
        self.config = config
        self.n_qk_heads, self.n_heads = config.n_heads, config.n_v_heads
        self.head_dim, self.v_head_dim = config.head_dim, config.v_head_dim
        self.key_width, self.value_width = config.key_width, config.value_width
        self.conv_dim = 2 * self.key_width + self.value_width
        self.chunk_size = config.chunk_size
        # Widths of the conv input (q, k, v), z, b and a in the projection.
        self.projection_widths = (self.conv_dim, self.value_width, self.n_heads, self.n_heads)
        self.in_proj = nn.Linear(d_model, sum(self.projection_widths), bias=False)
        # An nn.Conv1d only to hold the weights under the names and shapes fla and HF use.
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.conv_kernel, groups=self.conv_dim,
                                bias=config.conv_bias)
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.norm = HeadGatedRMSNorm(self.v_head_dim, config.norm_eps or norm_eps)
        self.out_proj = nn.Linear(self.value_width, d_model, bias=False) if output_projection else None
        self.reset_parameters()  # after every child: the order construction draws in (strata.models.init)

    def _project(self, u: torch.Tensor):
        qkv, z, b, a = project(self.in_proj, u).split_with_sizes(self.projection_widths, dim=-1)
        return qkv, (z, b, a)

    def _rule_inputs(self, conv: torch.Tensor, gates, A: torch.Tensor, dt_bias: torch.Tensor):
        """q, k [B, T, n_heads, head_dim], v [B, T, n_heads, v_head_dim], log-decay g and β [B, T, n_heads]."""
        _, b, a = gates
        q, k, v = self._qk(conv, self.n_qk_heads)
        beta = torch.sigmoid(b.float())
        if self.config.allow_neg_eigval:
            beta = beta * 2
        g = A * F.softplus(a.float() + dt_bias)
        return q, k, v, g, beta

    def _gated_output(self, o: torch.Tensor, gates) -> torch.Tensor:
        return self.norm(o, gates[0].unflatten(-1, (self.n_heads, self.v_head_dim))).flatten(-2)

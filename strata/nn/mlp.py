"""Feed-forward layers: SwiGLU, the squared-ReLU MLP, and a mixture of SwiGLU experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strata.config import FFNConfig
from strata.nn.linear import project


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``; with ``multipliers`` (g, d) (Falcon-H1's μP constants)
    ``d · down(silu(g · gate(x)) * up(x))``.

    Gate and up stay separate matmuls: fusing them into one measured ~10 % slower on CPU
    (the wider GEMM and the strided halves cost more than the saved pass over x).
    """

    def __init__(self, d_model: int, d_ffn: int, bias: bool = False, multipliers: tuple[float, float] = (1.0, 1.0)):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ffn, bias=bias)
        self.up = nn.Linear(d_model, d_ffn, bias=bias)
        self.down = nn.Linear(d_ffn, d_model, bias=bias)
        self.gate_multiplier, self.down_multiplier = multipliers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = project(self.gate, x)
        if self.gate_multiplier != 1:
            gate = gate * self.gate_multiplier
        out = project(self.down, F.silu(gate) * project(self.up, x))
        return out * self.down_multiplier if self.down_multiplier != 1 else out


class ReLU2MLP(nn.Module):
    """``down(relu(up(x))²)``: the squared-ReLU MLP of Nemotron-H (no gate)."""

    def __init__(self, d_model: int, d_ffn: int, bias: bool = False):
        super().__init__()
        self.up = nn.Linear(d_model, d_ffn, bias=bias)
        self.down = nn.Linear(d_ffn, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(self.down, F.relu(project(self.up, x)).square())


class MoE(nn.Module):
    """Shared experts plus top-k of ``n_experts`` routed SwiGLU experts (the MoE hybrids of "Hybrid
    Architectures for Language Models", Bae et al., 2025).

    The router scores experts with a sigmoid; a per-expert ``balance_bias`` is added to the
    scores only to *choose* experts, never to weight them, and is nudged after each optimiser
    step (``update_balance_bias``) towards experts that received fewer tokens: balancing without
    an auxiliary loss. Routed weights are the chosen sigmoid scores, normalised to sum to one when
    ``moe.normalize_weights`` (top-k > 1 only: at top-1 that weight would be the constant 1 and the
    router would never learn).

    ``router: softmax`` weighs the chosen experts by the softmax of their logits (Granite's), or
    with ``softmax_over: all`` by their probabilities under the softmax over every expert (Qwen3-
    Next's ``norm_topk_prob: false``). ``shared_gate`` scales the shared experts' summed output by
    sigmoid(shared_gate(x)), one gate per token (Qwen3-Next's).
    """

    def __init__(self, d_model: int, config: FFNConfig):
        super().__init__()
        moe = config.moe
        self.top_k = moe.top_k
        self.normalize_weights = moe.normalize_weights
        self.n_experts = moe.n_experts
        self.bias_update_rate = moe.bias_update_rate
        self.router_kind = moe.router
        self.softmax_over = moe.softmax_over
        self.router = nn.Linear(d_model, moe.n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d_model, config.expert_width) for _ in range(moe.n_experts))
        self.shared = nn.ModuleList(SwiGLU(d_model, config.shared_width) for _ in range(moe.n_shared))
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if moe.shared_gate else None
        # Only the sigmoid router balances through a bias.
        self.register_buffer("balance_bias", torch.empty(moe.n_experts) if moe.router == "sigmoid" else None)
        self.register_buffer("tokens_per_expert", torch.empty(moe.n_experts), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The balancing state: no bias yet, no tokens counted (router and experts reset themselves)."""
        if self.balance_bias is not None:
            nn.init.zeros_(self.balance_bias)
        nn.init.zeros_(self.tokens_per_expert)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = self.router(flat).float()
        if self.router_kind == "softmax" and self.softmax_over == "all":
            # Qwen3-Next's unnormalised top-k: the chosen experts' share of the whole softmax.
            weights, chosen = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        elif self.router_kind == "softmax":
            # Granite's router: softmax over the chosen experts' logits; no balancing bias.
            top, chosen = torch.topk(logits, self.top_k, dim=-1)
            weights = torch.softmax(top, dim=-1)
        else:
            scores = torch.sigmoid(logits)
            chosen = torch.topk(scores + self.balance_bias, self.top_k, dim=-1).indices
            weights = scores.gather(-1, chosen)
            if self.normalize_weights:
                weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        if self.training:
            self.tokens_per_expert += torch.bincount(chosen.flatten(), minlength=self.n_experts).float()
        out = torch.zeros_like(flat)
        # Every expert runs, on no rows when none chose it, so every parameter gets a gradient
        # (zero for an idle expert) at every step: the same set of gradients on every process,
        # which DDP's and FSDP's gradient reductions need.
        for expert_index, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == expert_index)
            out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None])
        if self.shared_gate is None:
            for expert in self.shared:
                out = out + expert(flat)
        else:
            shared = sum(expert(flat) for expert in self.shared)
            out = out + torch.sigmoid(project(self.shared_gate, flat)) * shared
        return out.reshape(x.shape)

    @torch.no_grad()
    def update_balance_bias(self) -> None:
        """After an optimiser step: raise the bias of under-loaded experts, lower over-loaded ones."""
        load = self.tokens_per_expert
        if load.sum() > 0 and self.balance_bias is not None:
            self.balance_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()


def build_ffn(d_model: int, config: FFNConfig) -> nn.Module | None:
    if config.kind == "none":
        return None
    if config.kind == "moe":
        return MoE(d_model, config)
    if config.kind == "relu2":
        return ReLU2MLP(d_model, config.d_ffn, config.bias)
    return SwiGLU(d_model, config.d_ffn, config.bias, config.multipliers)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [module for module in model.modules() if isinstance(module, MoE)]


def update_balance_biases(model: nn.Module) -> None:
    """Call after each optimiser step: aux-loss-free load balancing of every MoE layer in ``model``."""
    for moe in moe_layers(model):
        moe.update_balance_bias()

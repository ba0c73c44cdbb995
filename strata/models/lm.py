"""The language model: embedding -> blocks from a layout string -> final norm -> head."""

from __future__ import annotations

import math

import torch
from torch import nn

from strata.config import ModelConfig, RopeConfig, StackConfig
from strata.models.init import whole_parameters
from strata.models.state import CarriedState
from strata.nn.attention import Attention
from strata.nn.gated_deltanet import GatedDeltaNet
from strata.nn.kimi_delta import KimiDeltaAttention
from strata.nn.hybrid import OUTPUT_PROJECTIONS as HYBRID_OUTPUT_PROJECTIONS, IntraLayerHybrid
from strata.nn.mamba2 import Mamba2
from strata.nn.mlp import build_ffn, update_balance_biases
from strata.nn.norms import RMSNorm, rms_norm

# Projections that write into the residual stream; initialised smaller so the stream's variance
# does not grow with depth (GPT-2's 1/sqrt(2·layers) rule).
RESIDUAL_PROJECTIONS = ("o_proj", "out_proj", "down", *HYBRID_OUTPUT_PROJECTIONS)


def build_mixer(symbol: str, config: StackConfig, layer: int = 1) -> nn.Module:
    """The sequence mixer for one layout symbol at 1-indexed ``layer`` of its stack (Diff-T's λ
    of the intra-layer hybrid starts from a value that depends on it)."""
    d_model = config.d_model
    if symbol == "A":
        return Attention(d_model, config.attention, norm_eps=config.norm_eps)
    if symbol == "W":
        window = config.sliding_window
        return Attention(d_model, config.attention, window=window.window, sinks=window.sinks,
                         rope=RopeConfig(theta=window.rope_theta), norm_eps=config.norm_eps)
    if symbol == "M":
        return Mamba2(d_model, config.mamba, config.norm_eps)
    if symbol == "G":
        return GatedDeltaNet(d_model, config.gdn, config.norm_eps)
    if symbol == "K":
        return KimiDeltaAttention(d_model, config.kda, config.norm_eps)
    if symbol == "H":
        return IntraLayerHybrid(d_model, config.hybrid, config.norm_eps, layer)
    raise ValueError(f"unknown layout symbol {symbol!r}")


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + ffn(norm(x)) when the model has an FFN.

    An ``F`` block is the FFN half alone; a layout with ``F`` blocks gives the others no FFN
    (Nemotron-H). ``residual_multiplier`` m makes each half add m·f(norm(x)) (Granite). A block
    whose symbol is in ``post_norm`` normalises each half's output instead: x + norm(mixer(x)),
    then x + norm(ffn(x)) (OLMo Hybrid's attention blocks).
    """

    def __init__(self, symbol: str, config: StackConfig, layer: int = 1):
        super().__init__()
        self.symbol = symbol
        mixes = symbol != "F"
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps) if mixes else None
        self.mixer = build_mixer(symbol, config, layer) if mixes else None
        has_ffn = symbol == "F" or "F" not in config.layout
        self.ffn = build_ffn(config.d_model, config.ffn) if has_ffn else None
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps) if self.ffn is not None else None
        self.residual_multiplier = config.residual_multiplier
        self.post_norm = symbol in config.post_norm

    def forward(self, x: torch.Tensor, cache=None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.post_norm:
            return self._post_norm_forward(x, cache, segment_ids)
        # The norms are applied as functions, like the projections (see strata/nn/linear.py).
        if self.mixer is not None:
            normed = rms_norm(x, self.mixer_norm.weight, self.mixer_norm.eps)
            x = x + self._scaled(self.mixer(normed, cache=cache, segment_ids=segment_ids))
        if self.ffn is not None:
            x = x + self._scaled(self.ffn(rms_norm(x, self.ffn_norm.weight, self.ffn_norm.eps)))
        return x

    def _post_norm_forward(self, x: torch.Tensor, cache, segment_ids: torch.Tensor | None) -> torch.Tensor:
        if self.mixer is not None:
            update = self.mixer(x, cache=cache, segment_ids=segment_ids)
            x = x + self._scaled(rms_norm(update, self.mixer_norm.weight, self.mixer_norm.eps))
        if self.ffn is not None:
            x = x + self._scaled(rms_norm(self.ffn(x), self.ffn_norm.weight, self.ffn_norm.eps))
        return x

    def _scaled(self, update: torch.Tensor) -> torch.Tensor:
        return update * self.residual_multiplier if self.residual_multiplier != 1 else update


def build_stack(config: StackConfig) -> nn.ModuleList:
    """One block per symbol of ``config.layout``."""
    return nn.ModuleList(Block(symbol, config, layer) for layer, symbol in enumerate(config.layout, start=1))


def run_stack(blocks: nn.ModuleList, x: torch.Tensor, cache=None, lengths: torch.Tensor | None = None,
              segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``x`` through ``blocks``; with a ``StackCache`` (``strata.inference``) the steps of ``x``
    follow those the cache holds, and the cache advances past them (past the first ``lengths[b]``
    of row b when given: the rest is padding the cache forgets). ``segment_ids`` [B, T]: packed
    documents, which never see each other."""
    if cache is None:
        for block in blocks:
            x = block(x, segment_ids=segment_ids)
        return x
    if segment_ids is not None:
        raise ValueError("segment_ids apply to a whole-sequence forward, not to a cached one")
    if lengths is not None and not cache.holds_trailing_padding:
        # Refused before any layer runs, so no state has advanced.
        raise ValueError("sliding-window attention cannot hold trailing padding: a ring buffer cannot skip the holes")
    cache.sequence.begin(x.shape[1], lengths)
    for block, layer_cache in zip(blocks, cache.layers, strict=True):
        x = block(x, layer_cache)
    cache.sequence.commit()
    return x


@torch.no_grad()
def scaled_init(model: nn.Module, std: float, n_blocks: int, skip: tuple[str, ...] = ()) -> None:
    """Normal(0, std) for embeddings and projections; projections that write into a residual
    stream get std / sqrt(2 · n_blocks). A model's own ``reset_parameters``: it runs after every
    module has reset its own (``strata.models.init``). The children named in ``skip`` are left alone."""
    residual_std = std / math.sqrt(2 * n_blocks)
    for name, module in model.named_modules():
        if name.split(".", 1)[0] in skip:
            continue
        if isinstance(module, nn.Embedding):
            with whole_parameters(module):
                nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.Linear):
            is_residual = name.rsplit(".", 1)[-1] in RESIDUAL_PROJECTIONS
            with whole_parameters(module):
                nn.init.normal_(module.weight, std=residual_std if is_residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = build_stack(config)
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The scaled normal initialisation of embedding and projections (``scaled_init``)."""
        scaled_init(self, self.config.init_std, len(self.blocks))

    def forward(self, tokens: torch.Tensor, cache=None, last_only: bool = False, *,
                lengths: torch.Tensor | None = None, logits_at: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, state=None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab] ([B, 1, vocab] with ``last_only``; [N, vocab] at
        the N True places of a boolean [B, T] ``logits_at``, in row-major order). ``segment_ids``
        [B, T] (int): packed documents; positions of different ids never influence each other.

        With a ``StackCache`` (``strata.inference``) the tokens are the next steps after those
        the cache holds, and the cache advances past them; ``lengths`` [B] ends rows early: the
        steps of row b from ``lengths[b]`` on are padding the cache forgets.

        With a ``state`` (``self.carried_state()``, ``strata.models.state``) the tokens continue
        those of the earlier forwards given it, through autograd: ``model(x1, state=s)`` then
        ``model(x2, state=s)`` computes ``model(x1 ++ x2)``.
        """
        if state is not None:
            if cache is not None:
                raise ValueError("give a generation cache or a carried state, not both")
            cache = state
        if lengths is not None and cache is None:
            raise ValueError("lengths= ends rows of a cached forward early; there is no cache")
        x = self.embed(tokens)
        if self.config.embedding_multiplier != 1:
            x = x * self.config.embedding_multiplier
        x = run_stack(self.blocks, x, cache, lengths, segment_ids)
        x = self.norm(x[logits_at] if logits_at is not None else x[:, -1:] if last_only else x)
        logits = self.head(x) if self.head is not None else x @ self.embed.weight.t()
        return logits * self.config.logits_multiplier if self.config.logits_multiplier != 1 else logits

    def carried_state(self, max_context: int | None = None) -> CarriedState:
        """An empty carried state for ``forward(..., state=)``; attention keeps at most
        ``max_context`` keys of the past (all by default)."""
        return CarriedState(self.blocks, max_context)

    def update_balance_biases(self) -> None:
        """Call after each optimiser step: aux-loss-free load balancing of every MoE layer."""
        update_balance_biases(self)

"""AU-Net, the autoregressive U-Net over bytes (AU-Net brief §2).

Stage 1 reads bytes; each deeper stage reads the positions where the split rule puts a split of
its depth (words, word pairs, ...), so it runs on a shorter sequence. Every stage is a stack of
blocks with its own width and layout (attention, Mamba-2, hybrids):

    bytes -> E_1 -pool-> E_2 -pool-> ... trunk ... -up-> D_2 -up-> D_1 -> head

Pooling keeps the encoder output at each split position (RMSNorm, Linear). Upsampling spreads
each coarse vector over the finer positions of its *segment*, the split position itself and the
positions after it up to the next split; the copy at offset p is transformed per offset. A
decoder's input is its encoder's output (the skip) plus the upsampled deeper output.

Causality: the coarse vector of a split at position s has seen bytes <= s, and it is used at
positions >= s only. Position 0 (BOS) is a split at every stage, so every position has a segment.

``levels`` [B, T] give each byte its depth: 0 = no split, k = a split for stages 2..k+1. They come
from the data layer (``strata.data.levels``), which runs the split rule on the bytes; the model
never reads text. ``forward(tokens, cache=...)`` hands over to the cache (``strata.inference``),
which runs a deeper stage only on the steps that reach it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from strata.config import AUNetConfig
from strata.models.lm import build_stack, init_weights, run_stack
from strata.nn.mlp import update_balance_biases
from strata.nn.norms import RMSNorm, rms_norm


@dataclass
class Route:
    """How stage k+1's sequence sits on stage k's, for a batch.

    ``index`` [B, N]: the stage-k positions that are stage-(k+1) positions, in order, padded
    (with position 0) to the longest row or to the static length; ``real`` [B, N]: which of them
    are not padding. ``segment`` [B, T]: the stage-(k+1) position whose vector each stage-k
    position receives; ``offset`` [B, T]: how far past that split it lies.
    """

    index: torch.Tensor
    real: torch.Tensor
    segment: torch.Tensor
    offset: torch.Tensor

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of ``x`` [B, T, ...] at the split positions: [B, N, ...]."""
        index = self.index.view(*self.index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return x.gather(1, index)


def route(levels: torch.Tensor, depth: int, max_length: int | None = None) -> Route:
    """The route from a stage whose positions have ``levels`` [B, T] (-1 on padding) to the next
    stage, made of the positions of level ``depth`` or more; at most ``max_length`` of them (the
    first ones) when a static length is set, and then exactly that many, padded."""
    split = levels >= depth
    counts = split.sum(1)
    width = max_length if max_length is not None else max(int(counts.max()), 1)
    # Split positions first, in order (a stable sort of "not a split"), then the rest.
    order = torch.argsort((~split).to(torch.int8), dim=1, stable=True)
    index = order[:, :width]
    if index.shape[1] < width:
        index = F.pad(index, (0, width - index.shape[1]))
    kept = torch.clamp(counts, max=width)
    real = torch.arange(width, device=levels.device)[None] < kept[:, None]
    index = torch.where(real, index, 0)
    segment = (split.cumsum(1) - 1).clamp(0, width - 1)
    offset = torch.arange(levels.shape[1], device=levels.device)[None] - index.gather(1, segment)
    return Route(index, real, segment, offset)


class Pool(nn.Module):
    """Down: the vectors kept at the split positions, RMSNorm then Linear(d_in, d_out)."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(d_in, eps)
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, selected: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(selected))


class Upsample(nn.Module):
    """Up: coarse vectors [B, N, d_in] -> [B, T, d_out] at the finer positions of their segments.

    After an RMSNorm, every mode applies one shared Linear; ``multilinear`` adds one Linear per
    offset (offset mod ``max_offset``), ``repeat`` a learned bias per offset, and ``simple`` keeps
    the vector at offset 0 only (zero elsewhere).
    """

    def __init__(self, d_in: int, d_out: int, mode: str, max_offset: int, eps: float):
        super().__init__()
        self.mode, self.max_offset = mode, max_offset
        self.norm = RMSNorm(d_in, eps)
        self.proj = nn.Linear(d_in, d_out, bias=False)
        if mode == "multilinear":
            self.offset_weight = nn.Parameter(torch.empty(max_offset, d_out, d_in))
        elif mode == "repeat":
            self.offset_bias = nn.Parameter(torch.zeros(max_offset, d_out))

    def forward(self, coarse: torch.Tensor, segment: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        normed = rms_norm(coarse, self.norm.weight, self.norm.eps)
        shared = _gather_rows(F.linear(normed, self.proj.weight), segment)
        if self.mode == "simple":
            return shared * (offset == 0).unsqueeze(-1).to(shared.dtype)
        offset = torch.remainder(offset, self.max_offset)
        if self.mode == "repeat":
            return shared + self.offset_bias[offset]
        d_out = self.offset_weight.shape[1]
        if segment.shape[1] == 1:  # one position (a decoding step): only its own offset's matrix
            weight = self.offset_weight[offset[:, 0]]  # [B, d_out, d_in]
            source = _gather_rows(normed, segment)  # [B, 1, d_in]
            return shared + torch.bmm(source, weight.transpose(1, 2))
        # Every offset's output for every coarse vector, then each position takes its own: cheaper
        # than a matrix per position, since coarse vectors are few.
        every = F.linear(normed, self.offset_weight.reshape(-1, self.offset_weight.shape[2]))  # [B, N, M·d_out]
        every = every.view(every.shape[0], every.shape[1], self.max_offset, d_out).flatten(1, 2)  # [B, N·M, d_out]
        return shared + _gather_rows(every, segment * self.max_offset + offset)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] at index [B, T] -> [B, T, D]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class AUNet(nn.Module):
    def __init__(self, config: AUNetConfig):
        super().__init__()
        self.config = config
        stages = config.stages
        eps = stages[0].norm_eps
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.encoders = nn.ModuleList(build_stack(stage) for stage in stages[:-1])
        self.trunk = build_stack(stages[-1])
        self.decoders = nn.ModuleList(build_stack(stage) for stage in stages[:-1])
        self.pools = nn.ModuleList(
            Pool(fine.d_model, coarse.d_model, fine.norm_eps) for fine, coarse in itertools.pairwise(stages)
        )
        self.ups = nn.ModuleList(
            Upsample(coarse.d_model, fine.d_model, config.upsample, config.max_offset, coarse.norm_eps)
            for fine, coarse in itertools.pairwise(stages)
        )
        self.norm = RMSNorm(config.d_model, eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_weights(self, config.init_std, self.n_blocks)
        with torch.no_grad():
            for up in self.ups:
                if config.upsample == "multilinear":
                    nn.init.normal_(up.offset_weight, std=config.init_std)

    @property
    def n_stages(self) -> int:
        return self.config.n_stages

    @property
    def n_blocks(self) -> int:
        return len(self.trunk) + 2 * sum(len(encoder) for encoder in self.encoders)

    def forward(self, tokens: torch.Tensor, cache=None, last_only: bool = False, *, levels: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, logits_at: torch.Tensor | None = None):
        """tokens [B, T] and their levels [B, T] -> logits [B, T, vocab] ([B, 1, vocab] with
        ``last_only``; [N, vocab] at the N True places of a boolean [B, T] ``logits_at``). With a
        cache, the cache finds the levels and drives the stages. ``lengths`` (ending rows early,
        see ``LanguageModel.forward``) is refused: the byte stage's sliding windows cannot skip holes."""
        if lengths is not None:
            raise ValueError("an AU-Net cache cannot hold trailing padding (lengths=): its byte stage uses sliding windows")
        if cache is not None:
            return cache.forward(self, tokens, last_only, logits_at)
        if levels is None:
            raise ValueError(
                "AU-Net needs the split level of every byte: pass levels= (see strata.data.levels.model_inputs)"
            )
        if levels.shape != tokens.shape:
            raise ValueError(f"levels {tuple(levels.shape)} must have the shape of tokens {tuple(tokens.shape)}")
        levels = levels.to(device=tokens.device, dtype=torch.long).clone()
        levels[:, 0] = self.n_stages - 1  # position 0 opens a segment at every stage
        x = self.embed(tokens)
        skips, routes = [], []
        for depth, encoder in enumerate(self.encoders, start=1):
            x = run_stack(encoder, x)
            path = route(levels, depth, self.config.stages[depth].max_length)
            skips.append(x)
            routes.append(path)
            x = self.pools[depth - 1](path.select(x))
            levels = torch.where(path.real, path.select(levels), -1)
        y = run_stack(self.trunk, x)
        for stage in reversed(range(self.n_stages - 1)):
            path = routes[stage]
            y = run_stack(self.decoders[stage], skips[stage] + self.ups[stage](y, path.segment, path.offset))
        return self.logits(y[logits_at] if logits_at is not None else y[:, -1:] if last_only else y)

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        """The byte stage's output -> next-byte logits (the final norm, then the untied head)."""
        return self.head(self.norm(y))

    def update_balance_biases(self) -> None:
        """Call after each optimiser step: aux-loss-free load balancing of every MoE layer."""
        update_balance_biases(self)

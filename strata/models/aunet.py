"""AU-Net, the autoregressive U-Net over bytes ("From Bytes to Ideas: Language Modeling with
Autoregressive U-Nets", Videau et al., 2025, its architecture).

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

``levels`` [B, T] give each byte its depth: 0 = no split, k = a split for stages 2..k+1. The split
rule gives them (``strata.data.levels``): ``model(tokens)`` runs it on each row's ids, as the data
pipeline does on a stream that starts there; ``levels=`` passes them in (a training window cut
from a longer stream has the levels of that stream). ``model.splitter`` is the rule; the entropy
rule's scores bytes with a frozen byte-level language model, ``model.entropy``
(``strata.models.entropy``), so the data pipeline, evaluation and generation take the model's
splitter, never one rebuilt from the config.

One walk (``AUNet.descend``) runs the stages for the full forward and for decoding. With a cache
(``strata.inference.aunet_cache``, state only) the byte stage advances as one batch and each row
walks its deeper stages on its own, since rows reach different depths on the same step: a deeper
stage runs only on the steps that reach it, and the segment left open by the last call goes on.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from strata.config import AUNetConfig
from strata.data.levels import splitter_for, stream_levels
from strata.models.chunking import Chunking, Router
from strata.models.entropy import EntropyModel
from strata.models.init import whole_parameters
from strata.models.lm import build_stack, run_stack, scaled_init
from strata.models.state import AUNetCarriedState
from strata.nn.mlp import update_balance_biases
from strata.nn.norms import RMSNorm, rms_norm


@dataclass
class Route:
    """How stage k+1's sequence sits on stage k's, for a batch.

    ``split`` [B, T]: which stage-k positions are stage-(k+1) positions; ``width``: how many
    stage-(k+1) positions there are (the most of any row, or the static length). ``segment``
    [B, T]: the stage-(k+1) position whose vector each stage-k position receives; ``offset``
    [B, T]: how far past that split it lies. Computed when first used: ``index`` [B, width], the
    split positions in order, padded with position 0; ``real`` [B, width], which are not padding.
    """

    split: torch.Tensor
    width: int
    segment: torch.Tensor
    offset: torch.Tensor

    @functools.cached_property
    def real(self) -> torch.Tensor:
        return torch.arange(self.width, device=self.split.device)[None] < self.split.sum(1, keepdim=True)

    @functools.cached_property
    def index(self) -> torch.Tensor:
        # Split positions first, in order (a stable sort), then the rest.
        index = torch.argsort(self.split.to(torch.int8), dim=1, descending=True, stable=True)[:, : self.width]
        if index.shape[1] < self.width:
            index = F.pad(index, (0, self.width - index.shape[1]))
        return torch.where(self.real, index, 0)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of ``x`` [B, T, ...] at the split positions: [B, width, ...]."""
        index = self.index.to(x.device)
        return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def route(levels: torch.Tensor, depth: int, max_length: int | None = None, carry: torch.Tensor | None = None) -> Route:
    """The route from a stage whose positions have ``levels`` [B, T] (-1 on padding) to the next
    stage, made of the positions of level ``depth`` or more; at most ``max_length`` of them (the
    first ones) when a static length is set, and then exactly that many, padded.

    Position 0 must be a split, unless the positions go on a sequence whose next stage has a
    segment open (decoding): ``carry`` [B] is then the offset in it of the position before them.
    That segment is segment 0 of the route, and the positions before the first split go on in it."""
    split = levels >= depth
    count = split.cumsum(1)  # splits at or before each position
    width = max_length if max_length is not None else int(count.max())
    if max_length is not None:  # only the first splits are kept
        split, count = split & (count <= width), count.clamp(max=width)
    # Offset: how far past the latest split a position is (past the carried segment's, before the first).
    positions = torch.arange(levels.shape[1], device=levels.device)
    latest = torch.where(split, positions, 0 if carry is None else -1 - carry[:, None]).cummax(1).values
    return Route(split, width, count - 1 if carry is None else count, positions - latest)


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
            self.offset_bias = nn.Parameter(torch.empty(max_offset, d_out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offset biases start at zero. The offset matrices are the model's to draw, with its
        ``init_std``, after its projections (``AUNet.reset_parameters``)."""
        if self.mode == "repeat":
            nn.init.zeros_(self.offset_bias)

    def forward(self, coarse: torch.Tensor, segment: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        normed = rms_norm(coarse, self.norm.weight, self.norm.eps)
        if self.mode == "multilinear" and segment.shape[1] == 1:  # one position (a decoding step)
            source = _gather_rows(normed, segment)  # [B, 1, d_in]: only its own vector
            weight = self.offset_weight[torch.remainder(offset[:, 0], self.max_offset)]  # [B, d_out, d_in]: its offset's matrix
            return F.linear(source, self.proj.weight) + torch.bmm(source, weight.transpose(1, 2))
        shared = _gather_rows(F.linear(normed, self.proj.weight), segment)
        if self.mode == "simple":
            return shared * (offset == 0).unsqueeze(-1).to(shared.dtype)
        offset = torch.remainder(offset, self.max_offset)
        if self.mode == "repeat":
            return shared + self.offset_bias[offset]
        d_out = self.offset_weight.shape[1]
        # Every offset's output for every coarse vector, then each position takes its own: cheaper
        # than a matrix per position, since coarse vectors are few.
        every = F.linear(normed, self.offset_weight.reshape(-1, self.offset_weight.shape[2]))  # [B, N, M·d_out]
        every = every.view(every.shape[0], every.shape[1], self.max_offset, d_out).flatten(1, 2)  # [B, N·M, d_out]
        return shared + _gather_rows(every, segment * self.max_offset + offset)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] at index [B, T] -> [B, T, D]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class AUNet(nn.Module):
    # The entropy rule's byte model is filled after the AU-Net's own initialisation (and never by it).
    built_after_reset = ("entropy",)

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
        # The learned rule: a router per stage below the trunk, which places the next stage's splits.
        self.routers = nn.ModuleList(Router(stage.d_model) for stage in stages[:-1]) if config.split.rule == "learned" else None
        # The entropy rule: a frozen byte-level language model that scores the bytes
        # (``strata.models.entropy``); registered last, it draws nothing the rest would have drawn.
        if config.split.rule == "entropy":
            self.entropy = EntropyModel(config.split.entropy_model_config(), config.split.window)
            self.splitter = self.entropy.splitter(config)
        else:
            self.entropy = None
            self.splitter = splitter_for(config)
        # The learned rule's ratio loss and each stage's share of free positions chosen, of the
        # latest full forward (``auxiliary_loss``, ``split_rates``).
        self.ratio_loss: torch.Tensor | None = None
        self.split_rates: list[torch.Tensor] = []
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The scaled normal initialisation of embedding and projections (``scaled_init``), then
        N(0, init_std²) for the offset matrices of multilinear upsampling."""
        scaled_init(self, self.config.init_std, self.n_blocks, skip=("entropy",))
        if self.config.upsample == "multilinear":
            for up in self.ups:
                with torch.no_grad(), whole_parameters(up):
                    nn.init.normal_(up.offset_weight, std=self.config.init_std)
        for router in self.routers or []:
            with whole_parameters(router):
                router.reset_parameters()

    @property
    def n_stages(self) -> int:
        return self.config.n_stages

    @property
    def n_blocks(self) -> int:
        return len(self.trunk) + 2 * sum(len(encoder) for encoder in self.encoders)

    def forward(self, tokens: torch.Tensor, cache=None, last_only: bool = False, *, levels: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, logits_at: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, state=None):
        """tokens [B, T] -> logits [B, T, vocab] ([B, 1, vocab] with ``last_only``; [N, vocab] at
        the N True places of a boolean [B, T] ``logits_at``). ``levels`` [B, T]: the split levels
        of the tokens, by default ``split_levels(tokens)``. With a cache (``strata.inference``)
        the tokens are the steps after those it holds, and it finds their levels as they come.
        ``lengths`` (ending rows early, see ``LanguageModel.forward``) is refused: the byte
        stage's sliding windows cannot skip holes. ``segment_ids`` [B, T]: packed documents; each
        document's first byte is a split at every stage, so no pooled vector and no upsampled
        segment spans two documents, and every stage keeps its documents apart. With a ``state``
        (``self.carried_state()``) the tokens continue those of the earlier forwards given it,
        through autograd, as ``LanguageModel.forward`` describes."""
        if state is not None:
            if cache is not None:
                raise ValueError("give a generation cache or a carried state, not both")
            cache = state
        if lengths is not None:
            raise ValueError("an AU-Net cache cannot hold trailing padding (lengths=): its byte stage uses sliding windows")
        if cache is not None and levels is not None:
            raise ValueError("a cached AU-Net forward finds the levels of its steps itself; do not pass levels=")
        if levels is not None and levels.shape != tokens.shape:
            raise ValueError(f"levels {tuple(levels.shape)} must have the shape of tokens {tuple(tokens.shape)}")
        if segment_ids is not None:
            self._check_segments(cache)
        self.ratio_loss = None
        rows = None if cache is None else cache.feed(tokens)  # before the byte stage advances: it knows their padding
        x = run_stack(self.encoders[0], self.embed(tokens), None if cache is None else cache.byte_encoder,
                      segment_ids=segment_ids)
        if cache is None:
            levels = self.split_levels(tokens) if levels is None else levels.to(device=x.device, dtype=torch.long)
            if segment_ids is not None:  # every document opens a segment at every stage
                starts = F.pad(segment_ids[:, 1:] != segment_ids[:, :-1], (1, 0))
                levels = torch.where(starts.to(levels.device), self.n_stages - 1, levels)
            learned = [] if self.routers is not None else None
            up = self.descend(1, x, levels, segment_ids=segment_ids, learned=learned)
            if learned:
                self.ratio_loss = self.config.split.ratio_loss_weight * sum(loss for loss, _ in learned)
                self.split_rates = [rate for _, rate in learned]
        else:  # row by row: rows reach different depths
            up = torch.zeros_like(x)
            for row, begin, row_levels, stages in rows:
                up[row, begin:] = self.descend(1, x[row : row + 1, begin:], row_levels, stages)[0]
        y = run_stack(self.decoders[0], x + up, None if cache is None else cache.byte_decoder, segment_ids=segment_ids)
        return self.logits(y[logits_at] if logits_at is not None else y[:, -1:] if last_only else y)

    def _check_segments(self, cache) -> None:
        if cache is not None:
            raise ValueError("segment_ids apply to a whole-sequence forward, not to a cached one")
        if any(stage.max_length is not None for stage in self.config.stages):
            raise ValueError("segment_ids with a stage's max_length: a split dropped past it would join two documents")

    def descend(self, depth: int, hidden: torch.Tensor, levels: torch.Tensor, stages=None,
                segment_ids: torch.Tensor | None = None, learned: list | None = None,
                trace: list | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The walk below stage ``depth - 1``, whose output ``hidden`` [B, T, d] sits at positions
        with ``levels`` [B, T] (-1 on padding): pool the splits of stage ``depth``, run its encoder,
        the walk below it and its decoder (or the trunk), and return what it sends back up to every
        position, [B, T, d]. The levels may stay on the CPU when ``hidden`` is not.

        ``stages`` (decoding, one row): ``stages[k - 1]`` is the row's ``StageCache`` of
        ``config.stages[k]`` (``strata.inference.aunet_cache``), whose block caches advance and
        whose ``carried`` segment, left open by the last call, the positions before the first split
        go on in. A static ``max_length`` applies to the full forward only. ``segment_ids``
        [B, T]: the documents of the positions (their first positions are splits).

        The learned rule (``strata.models.chunking``) places the splits of stage ``depth`` here,
        from ``hidden``, and appends (its ratio loss, its rate) to ``learned`` when given. ``trace``
        (``boundary_levels``) collects (depth, the byte ``positions`` [B, T] of the positions,
        which of them split)."""
        stage = None if stages is None else stages[depth - 1]
        carried = None if stage is None else stage.carried
        if carried is None:  # a sequence's first position opens a segment at every stage
            levels = levels.clone()
            levels[:, 0] = self.n_stages - 1
        chunking = None
        if self.routers is not None:
            p, stage_key = self.routers[depth - 1](hidden, None if carried is None else stage.router_key)
            if stage is not None:
                stage.router_key = stage_key
            chunking = Chunking(p, levels, depth)
            levels = chunking.levels
            if learned is not None:
                learned.append((chunking.ratio_loss(self.learned_ratio(depth)), chunking.rate()))
        if trace is not None:
            trace.append((depth, positions, levels >= depth))
            if depth == self.n_stages - 1:  # the trunk places no splits: boundary_levels needs no more
                return torch.zeros_like(hidden)
        max_length = self.config.stages[depth].max_length if stage is None else None
        path = route(levels, depth, max_length, None if carried is None else carried[1])
        coarse = None if carried is None else carried[0]
        if path.width:
            x = self.pools[depth - 1](path.select(hidden))
            # Padding positions (past a row's splits) read position 0's document: they come after
            # every real position, so causality keeps them from reaching any.
            ids = None if segment_ids is None else path.select(segment_ids)
            if depth == self.n_stages - 1:
                y = run_stack(self.trunk, x, None if stage is None else stage.trunk, segment_ids=ids)
            else:
                x = run_stack(self.encoders[depth], x, None if stage is None else stage.encoder, segment_ids=ids)
                deeper = self.descend(depth + 1, x, torch.where(path.real, path.select(levels), -1), stages, ids,
                                      learned, trace, None if positions is None else path.select(positions))
                y = run_stack(self.decoders[depth], x + deeper, None if stage is None else stage.decoder, segment_ids=ids)
            if chunking is not None:
                y = chunking.smooth(y, path.select(chunking.p), None if carried is None else carried[0])
            coarse = y if coarse is None else torch.cat([coarse, y], 1)
        if stage is not None:
            stage.carried = (coarse[:, -1:], path.offset[:, -1])
        up = self.ups[depth - 1](coarse, path.segment.to(hidden.device), path.offset.to(hidden.device))
        return up if chunking is None else chunking.confident(up)

    def learned_ratio(self, depth: int) -> float:
        """The learned rule's target: stage-``depth`` positions per stage-(``depth`` + 1) position."""
        bytes_per_position = [1.0, *self.config.learned_compression()]
        return bytes_per_position[depth] / bytes_per_position[depth - 1]

    def auxiliary_loss(self) -> torch.Tensor | None:
        """What training adds to the loss of the latest full forward: the learned rule's ratio loss."""
        return self.ratio_loss

    def carried_state(self, max_context: int | None = None) -> AUNetCarriedState:
        """An empty carried state for ``forward(..., state=)`` (``strata.models.state``)."""
        return AUNetCarriedState(self, max_context)

    def split_levels(self, tokens: torch.Tensor) -> torch.Tensor:
        """The split level of every id of ``tokens`` [B, T], each row read as the start of a stream
        (``strata.data.levels.stream_levels``: bytes by the split rule, BOS at the top level, the
        rule started afresh after every special id such as left padding)."""
        rows = [stream_levels(row, self.splitter) for row in tokens.cpu().numpy()]
        return torch.from_numpy(np.array(rows, dtype=np.int64).reshape(tokens.shape)).to(tokens.device)

    @torch.no_grad()
    def boundary_levels(self, tokens: torch.Tensor) -> torch.Tensor:
        """The level [B, T] of every id of ``tokens`` as the full forward pools by it: k where the
        position starts a segment of stages 2..k+1, 0 where it starts none (what ``strata eval
        --boundaries`` shows). For a rule, ``split_levels``; for the learned rule, the splits its
        routers place in a full forward."""
        levels = self.split_levels(tokens)
        if self.routers is None:
            return levels
        trace = []
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        x = run_stack(self.encoders[0], self.embed(tokens))
        self.descend(1, x, levels, trace=trace, positions=positions)
        for depth, at, split in trace:  # a split of stage depth + 1 raises its byte's level to depth at least
            levels.scatter_reduce_(1, at.to(levels.device), torch.where(split, depth, 0).to(levels.device), reduce="amax")
        return levels

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        """The byte stage's output -> next-byte logits (the final norm, then the untied head)."""
        return self.head(self.norm(y))

    def update_balance_biases(self) -> None:
        """Call after each optimiser step: aux-loss-free load balancing of every MoE layer (the
        frozen entropy model's excepted)."""
        for name, child in self.named_children():
            if name != "entropy":
                update_balance_biases(child)

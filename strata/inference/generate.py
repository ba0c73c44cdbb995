"""Generation: prefill the prompts through the caches, then one cached step per new token.

Prompts of different lengths share one left-padded batch (the caches keep the padding out of every
state); a sequence that finishes leaves the batch, so it costs nothing more. ``use_cache=False``
is the slow reference: each step runs the full forward over each sequence alone.

With ``compile=True`` the one-token decoding step goes through ``torch.compile`` (inductor). A small
model's step is a chain of ~100 tiny ops whose per-op overhead dominates; fused, it measured
1.6-1.8x faster on a CPU (BENCHMARKS.md). Shapes are dynamic where they change: the first step
compiles with the cache's length symbolic (it grows every step); a shrinking batch, or a later
call with a cache of another capacity, recompiles once with that size symbolic; after that nothing
recompiles. Compiling every size symbolic from the start (``dynamic=True``) also makes the model's
widths and epsilons symbolic, whose guards dynamo re-checks in Python at every step. On a CPU the
compiled step has a C++ wrapper instead of a Python one. Together the two made a compiled step
15-30 % faster on the Xeon of BENCHMARKS.md. There, too, a batch of one has inductor compute its
projections itself, fused with the ops around them, rather than call MKL once per matrix-vector
product: 5-10 % faster again (the same with four rows measured 0-5 %, so larger batches keep MKL).
The first calls compile for 20-40 s (seconds once inductor has cached the code); a model compiles
once per process.

A model's *context* (``prompt_context``) is the length it was trained on, ``model.context_length``
(tokens; bytes for an AU-Net): its attention never saw positions beyond it. A model with no
attention at all (only Mamba-2 blocks, or intra-layer hybrids of two Mamba-2 branches) has no such
limit: its state has the same size after any number of tokens, so any prompt is read whole.
``generate`` itself reads any prompt (the long-context evaluations go past the context on purpose);
``strata generate`` refuses a longer prompt, or keeps its last tokens with ``--truncate left``. The
continuation may run past the context. ``cache_bytes`` is what the cache for a generation takes,
from the cost model, so that one too large for memory is refused before it is allocated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from strata.config import AUNetConfig, ModelConfig, StackConfig
from strata.cost.aunet import aunet_cost
from strata.cost.model import model_cost
from strata.data.levels import model_inputs
from strata.data.tokenizer import Tokenizer
from strata.inference import model_cache
from strata.inference.sampling import choose_tokens, penalize_repetition
from strata.inference.stop import StopStrings
from strata.models.aunet import AUNet

Prompt = str | bytes | Sequence[int] | np.ndarray | torch.Tensor


@dataclass
class Generation:
    """One prompt's continuation.

    ``tokens``: the new token ids (an EOS or stop token that ended the sequence is not included);
    ``text``: their decoded text up to any stop string, when a tokenizer was given;
    ``finish_reason``: "eos" (a stop token), "stop" (a stop string) or "length";
    ``logits``: with ``return_logits``, the fp32 logits [steps, vocab] each token was chosen from.
    """

    tokens: list[int]
    text: str | None
    finish_reason: str
    logits: torch.Tensor | None = None


def generate(
    model: torch.nn.Module,
    prompts: Prompt | Sequence[Prompt],
    max_new_tokens: int = 128,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: str | bytes | Sequence[str | bytes] = (),
    stop_tokens: Sequence[int] = (),
    seed: int | None = None,
    tokenizer: Tokenizer | None = None,
    prefill_chunk: int = 8192,
    use_cache: bool = True,
    return_logits: bool = False,
    on_token: Callable[[int, int], None] | None = None,
    on_text: Callable[[int, bytes], None] | None = None,
    compile: bool = False,  # noqa: A002 - the name users know from torch and HF
) -> list[Generation]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; ``temperature=0.0`` is greedy.

    A prompt is text (str, or bytes of any content; needs ``tokenizer``, which adds BOS) or a list
    of token ids used as they are. The tokenizer's EOS and any ``stop_tokens`` end a sequence, as
    does any of the ``stop`` strings. For streaming, ``on_token(index, token)`` receives each new
    token of prompt ``index`` as it is chosen, and ``on_text(index, data)`` its new bytes as they
    become final (stop strings never appear in them). Prompts are prefilled ``prefill_chunk``
    tokens at a time (a chunk after the first attends with an explicit mask, about half as fast
    as the causal kernel, so the default is large; lower it to bound activation memory).
    ``compile`` compiles the decoding step (module docstring); prefill stays eager.
    """
    _check_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty, prefill_chunk)
    if compile and not use_cache:
        raise ValueError("compile=True compiles the cached decoding step; use_cache=False has none")
    if compile and isinstance(model, AUNet):
        raise ValueError("compile=True is for LanguageModel decoding; AU-Net's steps run per-row Python that does not compile")
    prompt_ids = _prompt_ids(prompts, tokenizer, model.config.vocab_size)
    stops = [stop] if isinstance(stop, (str, bytes)) else list(stop)
    if stops and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the generated tokens")
    stop_ids = set(stop_tokens) | ({tokenizer.eos_id} if tokenizer is not None else set())
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop_bytes = [s.encode() if isinstance(s, str) else s for s in stops]
    outputs = [
        Continuation(index, max_new_tokens, stop_ids, tokenizer, StopStrings(stop_bytes), on_token, on_text)
        for index in range(len(prompt_ids))
    ]
    if max_new_tokens == 0:
        return [output.result(return_logits, model.config.vocab_size) for output in outputs]

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if use_cache:
                steps = _CachedSteps(model, prompt_ids, max_new_tokens, prefill_chunk, _compiled_step if compile else _step)
            else:
                steps = _FullSteps(model, prompt_ids)
            seen = _seen_tokens(prompt_ids, model.config.vocab_size, device) if repetition_penalty != 1.0 else None
            active = outputs  # the output each batch row belongs to
            logits = steps.first()
            while True:
                logits = logits.float()
                if seen is not None:
                    logits = penalize_repetition(logits, seen, repetition_penalty)
                chosen = choose_tokens(logits, temperature, top_k, top_p, generator)
                keep = [
                    row
                    for row, (output, token) in enumerate(zip(active, chosen.tolist(), strict=True))
                    if output.accept(token, logits[row] if return_logits else None)
                ]
                if not keep:
                    break
                if seen is not None:
                    seen[torch.arange(len(active), device=device), chosen] = True
                if len(keep) < len(active):  # finished sequences leave the batch
                    rows = torch.tensor(keep, device=device)
                    steps.select(rows)
                    chosen = chosen[rows]
                    seen = seen[rows] if seen is not None else None
                    active = [active[row] for row in keep]
                logits = steps.next(chosen)
    finally:
        model.train(was_training)
    return [output.result(return_logits, model.config.vocab_size) for output in outputs]


class Continuation:
    """One prompt's continuation as it grows: tokens, streamed text, why it ended."""

    def __init__(self, index, max_new_tokens, stop_ids, tokenizer, stops: StopStrings, on_token, on_text):
        self.index, self.max_new_tokens, self.stop_ids = index, max_new_tokens, stop_ids
        self.tokenizer, self.stops, self.on_token, self.on_text = tokenizer, stops, on_token, on_text
        self.tokens: list[int] = []
        self.logits: list[torch.Tensor] = []
        self.released = b""
        self.finish_reason = "length"

    def accept(self, token: int, logits: torch.Tensor | None) -> bool:
        """Take the next chosen token; False once the sequence has ended."""
        if logits is not None:
            self.logits.append(logits)
        if token in self.stop_ids:
            return self._finish("eos")
        self.tokens.append(token)
        if self.on_token is not None:
            self.on_token(self.index, token)
        if self.tokenizer is not None:
            data, stopped = self.stops.feed(self.tokenizer.decode([token]))
            self._release(data)
            if stopped:
                return self._finish("stop")
        if len(self.tokens) == self.max_new_tokens:
            return self._finish("length")
        return True

    def _finish(self, reason: str) -> bool:
        self.finish_reason = reason
        self._release(self.stops.flush())  # nothing is held back after a stop string
        return False

    def _release(self, data: bytes) -> None:
        if data and self.tokenizer is not None:
            self.released += data
            if self.on_text is not None:
                self.on_text(self.index, data)

    def result(self, return_logits: bool, vocab_size: int) -> Generation:
        logits = None
        if return_logits:
            logits = torch.stack(self.logits) if self.logits else torch.zeros(0, vocab_size)
        return Generation(
            tokens=self.tokens,
            text=self.released.decode("utf-8", errors="replace") if self.tokenizer is not None else None,
            finish_reason=self.finish_reason,
            logits=logits,
        )


def _step(model, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Logits [B, vocab] of the next token after ``tokens`` [B], one cached step."""
    return model(tokens[:, None], cache)[:, -1]


# Graphs the compiled step may keep (models × their variants) before dynamo falls back to eager.
COMPILED_GRAPHS = 64
# The cache's length (a Python int) grows by one every step: symbolic from the first compile, so
# that compile serves every later step instead of being thrown away at the second. Named as
# dynamo names it: the ``cache`` argument of ``_step``.
GROWING_LENGTH = "L['cache'].sequence.length"


@functools.cache
def _compiler(device_type: str):
    # One compiled function per device type for every model: dynamo keeps graphs per model it
    # meets (guarded on the model), and nothing here holds a model alive. Built on first use:
    # importing dynamo costs. The CPU options were measured there (module docstring): a C++
    # wrapper, and at batch 1 each projection as inductor's own reduction fused with its
    # neighbours instead of an MKL call per matrix-vector product.
    options = {"cpp_wrapper": True, "post_grad_fusion_options": {"decompose_mm_pass": {}}} if device_type == "cpu" else None
    return torch.compile(_step, options=options)


def _compiled_step(model, tokens: torch.Tensor, cache) -> torch.Tensor:
    # Each model takes a few graphs of this one function (sizes fixed, then symbolic; with and
    # without padding); dynamo's default of 8 per function would send a process that decodes
    # several models back to eager.
    try:
        with torch._dynamo.config.patch(recompile_limit=COMPILED_GRAPHS), torch.compiler.config.patch(dynamic_sources=GROWING_LENGTH):
            return _compiler(tokens.device.type)(model, tokens, cache)
    except torch._dynamo.exc.BackendCompilerFailed as error:
        raise RuntimeError(f"compile=True: torch.compile failed (on a CPU, inductor needs a C++ compiler): {error}") from None


class _CachedSteps:
    """Logits of the next token of every active sequence, from one left-padded batch and its cache."""

    def __init__(self, model, prompt_ids: list[list[int]], max_new_tokens: int, prefill_chunk: int, step=_step):
        self.model, self.step = model, step
        longest = max(map(len, prompt_ids))
        device = next(model.parameters()).device
        starts = [longest - len(ids) for ids in prompt_ids]
        self.batch = torch.zeros(len(prompt_ids), longest, dtype=torch.long, device=device)
        for row, ids in enumerate(prompt_ids):
            self.batch[row, starts[row] :] = torch.tensor(ids, dtype=torch.long)
        # Room for every step the generation can take, so the KV caches never reallocate.
        capacity = longest + max_new_tokens
        try:
            self.cache = model_cache(model, len(prompt_ids), capacity, starts=starts)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not isinstance(error, torch.OutOfMemoryError) and "can't allocate memory" not in str(error):
                raise
            dtype = next(model.parameters()).dtype
            needed = len(prompt_ids) * cache_bytes(model.config, capacity, dtype)
            raise MemoryError(f"the cache for {len(prompt_ids)} x {capacity:,} tokens ({needed / 2**30:,.1f} GiB by the "
                              f"cost model) cannot be allocated on {device}; ask for fewer new tokens") from None
        self.prefill_chunk = prefill_chunk

    def first(self) -> torch.Tensor:
        for start in range(0, self.batch.shape[1], self.prefill_chunk):
            logits = self.model(self.batch[:, start : start + self.prefill_chunk], self.cache, last_only=True)
        return logits[:, -1]

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.step(self.model, tokens, self.cache)

    def select(self, rows: torch.Tensor) -> None:
        self.cache.select(rows)


class _FullSteps:
    """The reference: the full forward over each sequence alone, every step."""

    def __init__(self, model, prompt_ids: list[list[int]]):
        self.model = model
        self.device = next(model.parameters()).device
        self.sequences = [list(ids) for ids in prompt_ids]

    def first(self) -> torch.Tensor:
        rows = [torch.tensor([ids], device=self.device) for ids in self.sequences]
        return torch.cat([self.model(row, **model_inputs(self.model, row))[:, -1] for row in rows])

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        for ids, token in zip(self.sequences, tokens.tolist(), strict=True):
            ids.append(token)
        return self.first()

    def select(self, rows: torch.Tensor) -> None:
        self.sequences = [self.sequences[row] for row in rows.tolist()]


def prompt_context(config: ModelConfig | AUNetConfig) -> int | None:
    """The longest prompt ``strata generate`` reads whole, in tokens: the model's context_length, or
    None for a model without attention (module docstring)."""
    stacks = config.stages if isinstance(config, AUNetConfig) else [config]
    return None if all(_attention_free(stack) for stack in stacks) else config.context_length


def _attention_free(stack: StackConfig) -> bool:
    return all(symbol == "M" or (symbol == "H" and "attention" not in stack.hybrid.branch_kinds) for symbol in stack.layout)


def cache_bytes(config: ModelConfig | AUNetConfig, tokens: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the cache of one sequence of ``tokens`` tokens (prompt and new ones), from the cost
    model: the KV caches grow with it, Mamba-2 states and sliding windows do not."""
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    cost = aunet_cost(config, tokens, name) if isinstance(config, AUNetConfig) else model_cost(config, tokens, name)
    return cost.cache_bytes


def _seen_tokens(prompt_ids: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    seen = torch.zeros(len(prompt_ids), vocab_size, dtype=torch.bool, device=device)
    for row, ids in enumerate(prompt_ids):
        seen[row, torch.tensor(ids, dtype=torch.long, device=device)] = True
    return seen


def _prompt_ids(prompts, tokenizer: Tokenizer | None, vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt; one prompt (text or a list of ids) counts as a batch of one."""
    if isinstance(prompts, (str, bytes, torch.Tensor, np.ndarray)) or (
        prompts and all(isinstance(item, (int, np.integer)) for item in prompts)
    ):
        prompts = [prompts]
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    result = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)):
            if tokenizer is None:
                raise ValueError(f"prompt {index} is text; pass tokenizer= to encode it (or give token ids)")
            data = prompt.encode("utf-8", errors="surrogateescape") if isinstance(prompt, str) else prompt
            ids = [tokenizer.bos_id, *tokenizer.encode(data).tolist()]
        else:
            ids = prompt.tolist() if isinstance(prompt, (torch.Tensor, np.ndarray)) else list(prompt)
            if not all(isinstance(token, (int, np.integer)) and not isinstance(token, bool) for token in ids):
                raise ValueError(f"prompt {index} must be text or a flat list of integer token ids")
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        bad = [token for token in ids if not 0 <= token < vocab_size]
        if bad:
            raise ValueError(f"prompt {index} has token id {bad[0]}, outside the model's vocabulary of {vocab_size}")
        result.append([int(token) for token in ids])
    return result


def _check_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty, prefill_chunk) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")

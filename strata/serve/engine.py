"""Continuous batching: one thread runs the model for every request the server has.

Each iteration of the engine's loop
  1. drops the requests whose client went away (their rows leave the batch at this step),
  2. starts prefilling waiting requests while the batch has free slots (``max_batch`` rows, a
     request holding ``n`` of them), each in a cache of its own, restored from the prefix cache
     as far as its prompt's whole blocks were seen before (``strata.serve.prefix_cache``),
  3. prefills blocks (``block`` tokens each, the oldest request's first) until the step's
     ``prefill_tokens`` are spent, snapshotting each request's cache at its blocks' ends; requests
     whose prompts are done choose their first tokens and their rows join the decoding batch,
     all in one ``StackCache.join`` (rows keep their own KV entries, ring buffers, conv and SSM
     states, AU-Net stage caches, right-aligned in one batch),
  4. runs one decoding step for every row of the batch; rows that finish leave it.
So a long prompt delays the others by at most ``prefill_tokens`` (or one block, if larger) per
step, never by its whole prefill; and a burst of short prompts is read in a few steps, so the
batch fills before it is decoded, rather than one newcomer per (mostly empty) decoding step.

Every prompt is prefilled alone in the same blocks, whether its prefix was cached or not, so a
prefix hit gives the cold run's logits exactly. Decoding runs the rows as one batch; a row's
logits differ from decoding it alone only by the rounding of a wider matrix product (tests hold
greedy tokens equal to ``strata generate``'s).

A request receives its events through ``Request.emit``, called on the engine's thread: ``Token``
for every new token of each of its ``n`` continuations, ``Finish`` when one ends, and ``Done``
(or ``Failed``) once all have.
"""

from __future__ import annotations

import codecs
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from strata.data.tokenizer import Tokenizer
from strata.inference import model_cache
from strata.inference.aunet_cache import AUNetCache
from strata.inference.cache import StackCache
from strata.inference.generate import Continuation
from strata.inference.sampling import choose_tokens, penalize_repetition
from strata.inference.stop import StopStrings
from strata.serve.metrics import Histogram
from strata.serve.prefix_cache import PrefixCache

# Steps the joined batch's KV caches have room for before they grow (they grow by themselves).
JOIN_ROOM = 256
# Prompt tokens a step prefills before its decoding step (``strata serve --prefill-tokens``).
PREFILL_TOKENS = 1024
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # strata's -> OpenAI's


@dataclass(frozen=True)
class Sampling:
    """How a request's continuations are chosen; ``logprobs`` = k gives the chosen token's log-
    probability and the k most likely tokens' (None: none)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float = 1.0
    stop: tuple[bytes, ...] = ()
    stop_tokens: frozenset[int] = frozenset()
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None
    ignore_eos: bool = False


@dataclass
class Token:
    """A new token of continuation ``choice`` and the text that became final with it (stop strings
    never appear); ``token`` None: no token, the text held back when a stop token ended it."""

    choice: int
    token: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class Finish:
    choice: int
    reason: str  # "stop" or "length", as the OpenAI API names them


@dataclass
class Done:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Failed:
    message: str


@dataclass
class Request:
    ids: list[int]
    sampling: Sampling
    emit: Callable[[object], None]
    cancelled: bool = False  # set from any thread; the engine drops the request at its next step
    cached: int = 0  # prompt tokens restored from the prefix cache (set by the engine)
    generated: int = 0  # tokens emitted so far, all continuations (set by the engine)
    arrived: float = field(default_factory=time.perf_counter)


class QueueFull(Exception):
    pass


@dataclass
class _Prefill:
    """A request whose prompt is being read into a cache of its own (``cache.length`` tokens so far)."""

    request: Request
    cache: object


class _Row:
    """One continuation of a request in the decoding batch."""

    def __init__(self, request: Request, choice: int, tokenizer: Tokenizer, vocab_size: int, device, counters: dict):
        sampling = request.sampling
        self.request, self.choice, self.sampling, self.counters = request, choice, sampling, counters
        stop_ids = set(sampling.stop_tokens) | (set() if sampling.ignore_eos else {tokenizer.eos_id})
        self.released = b""
        self.continuation = Continuation(choice, sampling.max_tokens, stop_ids, tokenizer, StopStrings(list(sampling.stop)),
                                         None, self._on_text)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.generator = None
        if sampling.temperature > 0:
            seed = torch.seed() if sampling.seed is None else sampling.seed + choice
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.seen = None
        if sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(request.ids, device=device)] = True
        self.last: int | None = None

    def _on_text(self, _index: int, data: bytes) -> None:
        self.released += data

    def advance(self, logits: torch.Tensor, greedy: int) -> bool:
        """Choose this row's next token from its logits [1, V] (``greedy``: their argmax), emit
        it; False once the continuation has ended."""
        sampling = self.sampling
        token = greedy
        if self.seen is not None or sampling.temperature > 0:
            chosen = logits if self.seen is None else penalize_repetition(logits, self.seen, sampling.repetition_penalty)
            token = int(choose_tokens(chosen, sampling.temperature, sampling.top_k, sampling.top_p, self.generator))
            if self.seen is not None:
                self.seen[0, token] = True
        logprob = top = None
        if sampling.logprobs is not None:
            logprobs = torch.log_softmax(logits[0], dim=-1)
            logprob = float(logprobs[token])
            if sampling.logprobs:
                best = torch.topk(logprobs, min(sampling.logprobs, logprobs.shape[0]))
                top = list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
        alive = self.continuation.accept(token, None)
        text = self.decoder.decode(self.released, final=not alive)
        self.released = b""
        if not alive and self.continuation.finish_reason == "eos":  # a stop token is not part of the output
            if text:
                self.request.emit(Token(self.choice, None, text))
        else:
            self.request.generated += 1
            self.counters["generated_tokens"] += 1
            self.request.emit(Token(self.choice, token, text, logprob, top))
        self.last = token
        if not alive:
            self.request.emit(Finish(self.choice, FINISH_REASONS[self.continuation.finish_reason]))
        return alive


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, *, max_batch: int = 32, max_queue: int = 128,
                 block: int = 256, prefill_tokens: int = PREFILL_TOKENS, cache_memory: int = 1 << 30):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        self.prefix = PrefixCache(block, cache_memory)
        self._inbox: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._waiting: deque[Request] = deque()
        self._prefilling: list[_Prefill] = []
        self._rows: list[_Row] = []
        self._cache = None
        self._pending: dict[int, int] = {}  # id(request) -> its continuations still running
        self._lock = threading.Lock()
        self._queued = 0
        self.latency = {"time_to_first_token": Histogram(), "request_duration": Histogram()}
        self.counters = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "prefix_hits": 0, "prefix_hit_tokens": 0, "failed": 0, "decode_steps": 0, "decoded_rows": 0}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the server's side (any thread) -----------------------------------------------------

    def start(self) -> None:
        """Run the engine in a thread of its own (``run`` runs it in the caller's)."""
        self._thread = threading.Thread(target=self.run, args=(self._stopping.is_set,), name="strata-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join()

    def submit(self, request: Request) -> None:
        """Queue ``request``; QueueFull when ``max_queue`` requests already wait for a slot."""
        with self._lock:
            if self._queued >= self.max_queue:
                raise QueueFull(f"{self._queued} requests are waiting for a slot (--max-queue {self.max_queue})")
            self._queued += 1
        self._inbox.put(request)

    def gauges(self) -> dict[str, float]:
        """What /metrics shows besides the counters (read without stopping the engine)."""
        caches = [self._cache] if self._cache is not None else []
        caches += [prefill.cache for prefill in list(self._prefilling)]
        return {"queue_length": self._queued, "batch_size": len(self._rows), "prefilling": len(self._prefilling),
                "cache_bytes": sum(cache.nbytes for cache in caches), "prefix_cache_bytes": self.prefix.nbytes,
                "prefix_cache_blocks": len(self.prefix)}

    # --- the engine's thread ----------------------------------------------------------------

    def run(self, until: Callable[[], bool]) -> None:
        """Serve requests until ``until()`` (checked at every step, and when idle every 0.1 s).

        Best in the thread that loaded the model: PyTorch's OpenMP threads belong to the thread
        that starts a parallel region, and with a second such thread on the machine's cores
        libgomp stops spinning between regions and sleeps instead, so each small op of a decoding
        step waits on a wake-up (a [1, 128] x [128, 384] matmul: 5 us in the loading thread, 12-60
        us in another, on the 2-core Xeon of BENCHMARKS.md). ``strata serve`` runs the engine in
        the main thread and the HTTP server in another."""
        with torch.inference_mode():
            while not until():
                idle = not (self._waiting or self._prefilling or self._rows)
                self._take_inbox(block=idle)
                try:
                    self._iterate()
                except Exception as error:  # noqa: BLE001 - every request in flight is told, the engine goes on
                    self._fail_all(f"{type(error).__name__}: {error}")

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _iterate(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._prefill()
        if self._rows:
            self._decode_step()

    def _slots_used(self) -> int:
        return len(self._rows) + sum(prefill.request.sampling.n for prefill in self._prefilling)

    def _admit(self) -> None:
        while self._waiting and self._slots_used() + self._waiting[0].sampling.n <= self.max_batch:
            request = self._waiting.popleft()
            self._unqueue(1)
            try:
                chain = self.prefix.lookup(request.ids)
                cache = model_cache(self.model, 1, len(request.ids))  # the batch it joins grows as it needs
                if chain:
                    cache.load(chain)
            except (MemoryError, RuntimeError) as error:  # this request's cache: the others go on
                request.emit(Failed(f"{type(error).__name__}: {error}"))
                continue
            request.cached = cache.length
            self.counters["requests"] += 1
            self.counters["prompt_tokens"] += len(request.ids)
            self.counters["prefix_hits"] += bool(chain)
            self.counters["prefix_hit_tokens"] += cache.length
            self._prefilling.append(_Prefill(request, cache))

    def _prefill(self) -> None:
        """Prefill blocks, oldest request first, until this step's ``prefill_tokens`` are spent
        (at least one block); the requests whose prompts are done start decoding."""
        done, spent = [], 0
        while self._prefilling:
            prefill = self._prefilling[0]
            end = self._block_end(prefill)
            if spent and spent + end - prefill.cache.length > self.prefill_tokens:
                break
            spent += end - prefill.cache.length
            logits = self._prefill_block(prefill, end)
            if end == len(prefill.request.ids):
                self._prefilling.pop(0)
                done.append((prefill, logits))
        if done:
            self._start_decoding(done)

    def _block_end(self, prefill: _Prefill) -> int:
        """Where the next block of ``prefill``'s prompt ends: blocks end at multiples of ``block``."""
        block = self.prefix.block
        return min((prefill.cache.length // block + 1) * block, len(prefill.request.ids))

    def _prefill_block(self, prefill: _Prefill, end: int) -> torch.Tensor:
        """Read the prompt up to ``end`` into ``prefill``'s cache, keeping it in the prefix cache
        if wanted; the last position's logits [1, V]."""
        ids, start = prefill.request.ids, prefill.cache.length
        tokens = torch.tensor([ids[start:end]], device=self.device)
        logits = self.model(tokens, prefill.cache, last_only=True)[:, -1].float()
        if self.prefix.wants(ids[:end]):
            snapshot = prefill.cache.snapshot(start)
            self.prefix.insert(ids[:end], snapshot, snapshot.nbytes)
        return logits

    def _start_decoding(self, done: list[tuple[_Prefill, torch.Tensor]]) -> None:
        """The first tokens of requests whose prompts are read; their rows (each cache forked
        ``n`` times) join the batch together."""
        caches = [self._cache] if self._cache is not None else []
        for prefill, logits in done:
            request, n = prefill.request, prefill.request.sampling.n
            rows = [_Row(request, choice, self.tokenizer, self.vocab_size, self.device, self.counters) for choice in range(n)]
            self._pending[id(request)] = n
            alive = [row.advance(logits, int(logits.argmax())) for row in rows]
            self.latency["time_to_first_token"].observe(time.perf_counter() - request.arrived)
            self._finish_rows(request, alive.count(False))
            rows = [row for row, keep in zip(rows, alive, strict=True) if keep]
            if not rows:
                continue
            caches.append(prefill.cache if len(rows) == 1
                          else prefill.cache.fork(torch.zeros(len(rows), dtype=torch.long, device=self.device), room=0))
            self._rows += rows
        if caches and caches[-1] is not self._cache:
            join = AUNetCache.join if isinstance(caches[-1], AUNetCache) else StackCache.join
            self._cache = join(caches, room=JOIN_ROOM)

    def _decode_step(self) -> None:
        tokens = torch.tensor([row.last for row in self._rows], device=self.device)
        logits = self.model(tokens[:, None], self._cache)[:, -1].float()
        greedy = logits.argmax(-1).tolist()
        self.counters["decode_steps"] += 1
        self.counters["decoded_rows"] += len(self._rows)
        keep = []
        for index, row in enumerate(self._rows):
            if row.advance(logits[index : index + 1], greedy[index]):
                keep.append(index)
            else:
                self._finish_rows(row.request, 1)
        self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[index] for index in keep]
        if self._rows:
            self._cache.select(torch.tensor(keep, device=self.device))
        else:
            self._cache = None

    def _finish_rows(self, request: Request, finished: int) -> None:
        if not finished:
            return
        self._pending[id(request)] -= finished
        if self._pending[id(request)] == 0:
            del self._pending[id(request)]
            self.latency["request_duration"].observe(time.perf_counter() - request.arrived)
            request.emit(Done(len(request.ids), request.generated, request.cached))

    def _drop_cancelled(self) -> None:
        """Requests whose client went away leave the queue, the prefills and the batch."""
        waiting = deque(request for request in self._waiting if not request.cancelled)
        self._unqueue(len(self._waiting) - len(waiting))
        self._waiting = waiting
        self._prefilling = [prefill for prefill in self._prefilling if not prefill.request.cancelled]
        for row in self._rows:
            if row.request.cancelled:
                self._pending.pop(id(row.request), None)
        self._keep_rows([index for index, row in enumerate(self._rows) if not row.request.cancelled])

    def _unqueue(self, count: int) -> None:
        with self._lock:
            self._queued -= count

    def _fail_all(self, message: str) -> None:
        requests = itertools.chain((prefill.request for prefill in self._prefilling), (row.request for row in self._rows))
        for request in {id(request): request for request in requests}.values():
            request.emit(Failed(message))
        self.counters["failed"] += 1
        self._prefilling, self._rows, self._cache, self._pending = [], [], None, {}

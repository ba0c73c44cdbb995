"""``strata serve``: an OpenAI-compatible server with continuous batching and prefix caching over
every mixer's cache (``engine``, ``prefix_cache``, ``app``)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

from strata.inference.generate import prompt_context
from strata.serve.app import Served, create_app
from strata.serve.chat import chat_template
from strata.serve.engine import PREFILL_TOKENS, Engine
from strata.train.runs import from_pretrained


def load_served(path: str | Path, *, name: str | None = None, dtype: torch.dtype | str | None = None,
                device: str = "cpu", max_batch: int = 32, max_queue: int = 128, snapshot_every: int = 256,
                prefill_tokens: int = PREFILL_TOKENS, cache_memory: int = 1 << 30) -> Served:
    """The model at ``path`` (as ``strata.from_pretrained`` opens it) behind an engine, not yet started."""
    trained = from_pretrained(path, dtype=dtype, device=device)
    if trained.tokenizer is None:
        raise ValueError(f"{path}: has no tokenizer.json; the server needs the model's tokenizer beside it")
    engine = Engine(trained.model, trained.tokenizer, max_batch=max_batch, max_queue=max_queue, block=snapshot_every,
                    prefill_tokens=prefill_tokens, cache_memory=cache_memory)
    chat = chat_template(trained.tokenizer)
    return Served(engine, name or Path(path).resolve().name, trained.tokenizer, prompt_context(trained.config.model), chat)


def serve(served: Served, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Answer on ``host``:``port`` until SIGTERM or Ctrl-C, which first let running requests finish
    (a second one stops at once). The HTTP server runs in a thread, the engine in this one (see
    ``Engine.run``); uvicorn leaves signals to the main thread, which passes them on."""
    import uvicorn

    config = uvicorn.Config(create_app(served), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)

    def shut_down(_signal, _frame):
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    previous = {number: signal.signal(number, shut_down) for number in (signal.SIGINT, signal.SIGTERM)}
    http = threading.Thread(target=server.run, name="strata-http")
    http.start()
    try:
        served.engine.run(until=lambda: not http.is_alive())
    finally:
        server.should_exit = True
        http.join()
        for number, handler in previous.items():
            signal.signal(number, handler)
    if not server.started:
        raise OSError(f"the server could not start on {host}:{port} (is the port in use?)")

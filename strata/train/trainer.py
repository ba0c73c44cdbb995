"""The training loop: data -> model -> AdamW steps, validation in bits per byte, checkpoints.

Nothing model-specific happens here: any config that ``build_model`` accepts trains the same way.
A run directory holds the resolved config, the tokenizer, ``metrics.jsonl`` (one JSON object per
optimiser step and one per validation) and the checkpoints; ``resume=True`` continues the exact run
(same data order, optimiser state and RNG), so 20 + 20 steps equal 40 steps.
"""

from __future__ import annotations

import gzip
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from strata.analysis import training_flops
from strata.config import Config, config_to_dict, validate_config
from strata.data import (
    Document,
    TokenLoader,
    build_tokenizer,
    load_documents,
    load_tokenizer,
    model_levels,
    pack,
    split_documents,
)
from strata.evals.bpb import bits_per_byte
from strata.inference.generate import generate
from strata.models import build_model
from strata.train.checkpoint import (
    latest_checkpoint,
    load_model_weights,
    restore_rng,
    save_checkpoint,
)
from strata.train.metrics import MetricsLog, Progress
from strata.train.optim import build_optimizer, learning_rate_factor


class TrainingError(RuntimeError):
    """The run cannot go on; the message names the step and the reason."""


@dataclass
class RunResult:
    run_dir: Path
    step: int
    tokens: int
    val_bpb: float
    gzip_bpb: float
    sample: str
    stopped_early: str | None = None


def prepare_run_dir(run_dir: Path) -> None:
    """Create the run directory and prove it is writable, before any work is done."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise TrainingError(f"{run_dir}: run directory is not writable ({error.strerror})") from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def gzip_bits_per_byte(documents: list[Document]) -> float:
    """The held-out text compressed by gzip -9, in bits per byte: the baseline to beat."""
    data = b"".join(document.text for document in documents)
    return 8 * len(gzip.compress(data, compresslevel=9)) / max(1, len(data))


def head_of(documents: list[Document], limit: int) -> list[Document]:
    """The first ``limit`` bytes of the documents (for cheap periodic validation)."""
    kept, remaining = [], limit
    for document in documents:
        if remaining <= 0:
            break
        kept.append(Document(document.name, document.text[:remaining]))
        remaining -= len(kept[-1].text)
    return kept


def plan_steps(config: Config, tokens_per_step: int, flops_per_token: float) -> int:
    """Optimiser steps the run will take: the first budget reached among steps, tokens, FLOPs."""
    train = config.train
    budgets = [train.steps]
    if train.tokens is not None:
        budgets.append(math.ceil(train.tokens / tokens_per_step))
    if train.flops is not None:
        budgets.append(max(1, math.floor(train.flops / (flops_per_token * tokens_per_step))))
    return min(budgets)


class Trainer:
    def __init__(self, config: Config, run_dir: Path, resume: bool = False, quiet: bool = False):
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.quiet = quiet
        prepare_run_dir(self.run_dir)
        train = config.train

        # Data first: every bad input is reported before a model is built.
        documents = load_documents(config.data.sources, config.data.text_field)
        self.train_documents, self.valid_documents = split_documents(documents, config.data.valid_fraction)
        tokenizer_file = self.run_dir / "tokenizer.json"
        if resume and tokenizer_file.exists():
            self.tokenizer = load_tokenizer(self.run_dir)
        else:
            self.tokenizer = build_tokenizer(config.data, self.train_documents)
        if config.model.vocab_size != self.tokenizer.vocab_size:
            data = config_to_dict(config)
            data["model"]["vocab_size"] = self.tokenizer.vocab_size
            config = validate_config(data, "model.vocab_size from the tokenizer")
        self.config = config
        self.seq_len = train.seq_len or config.model.context_length

        self.device = resolve_device(train.device)
        precision = train.precision if train.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.autocast = precision == "bf16"
        torch.manual_seed(train.seed)
        self.model = build_model(config, device=self.device)
        self.optimizer = build_optimizer(self.model, train)
        self.forward = torch.compile(self.model) if train.compile else self.model

        stream = pack(self.train_documents, self.tokenizer)
        levels = model_levels(config.model, stream)
        self.loader = TokenLoader(stream, self.seq_len, train.batch_size, train.seed, levels)
        self.tokens_per_step = train.batch_size * self.seq_len * train.grad_accum
        flops_per_token, self.flops_per_token = training_flops(config.model, self.seq_len, levels)
        self.total_steps = plan_steps(config, self.tokens_per_step, flops_per_token)

        self.step, self.tokens, self.bad_in_a_row, self.elapsed = 0, 0, 0, 0.0
        if resume:
            self._restore()
        else:
            self._start_fresh()
        self.metrics = MetricsLog(self.run_dir, truncate_after=self.step)

    def _start_fresh(self) -> None:
        if (self.run_dir / "checkpoints").exists() and any((self.run_dir / "checkpoints").iterdir()):
            raise TrainingError(
                f"{self.run_dir}: already holds checkpoints; continue it with --resume {self.run_dir} or choose another --out"
            )
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.config), sort_keys=False))
        self.tokenizer.save(self.run_dir)

    def _restore(self) -> None:
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            raise TrainingError(f"{self.run_dir}: no readable checkpoint to resume from")
        load_model_weights(self.model, checkpoint.model, checkpoint.path)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        restore_rng(checkpoint.rng)
        state = checkpoint.state
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens = checkpoint.step, state["tokens"]
        self.bad_in_a_row, self.elapsed = state["bad_in_a_row"], state["elapsed"]

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> RunResult:
        train = self.config.train
        interrupted = {"flag": False}

        def on_interrupt(signum, frame):
            if interrupted["flag"]:
                raise KeyboardInterrupt
            interrupted["flag"] = True

        previous_handler = signal.signal(signal.SIGINT, on_interrupt)
        stopped_early = None
        start_time = time.perf_counter() - self.elapsed
        progress = Progress(self.total_steps, self.step, quiet=self.quiet)
        try:
            while self.step < self.total_steps:
                record = self._train_step()
                self.elapsed = time.perf_counter() - start_time
                record.update(time=round(self.elapsed, 3), tokens_per_s=round(self.tokens / max(self.elapsed, 1e-9)))
                self.metrics.write(record)
                progress.update(self.step, record)
                if self.bad_in_a_row >= train.max_bad_steps:
                    raise TrainingError(
                        f"step {self.step}: loss or gradient non-finite for {self.bad_in_a_row} steps in a row; "
                        f"stopping (checkpoints, if any, are in {self.run_dir / 'checkpoints'})"
                    )
                if self.step % train.eval_every == 0 and self.step < self.total_steps:
                    progress.update(self.step, self._validate(head_of(self.valid_documents, train.eval_bytes)))
                if self.step % train.save_every == 0:
                    self._save()
                if interrupted["flag"]:
                    stopped_early = "interrupted"
                    break
                if train.time_limit is not None and self.elapsed >= train.time_limit:
                    stopped_early = "time limit"
                    break
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            progress.close()
        self._save()
        final = self._validate(self.valid_documents)
        text = self._sample()
        return RunResult(self.run_dir, self.step, self.tokens, final["val_bpb"], gzip_bits_per_byte(self.valid_documents), text, stopped_early)

    def _train_step(self) -> dict:
        train = self.config.train
        lr = train.lr * learning_rate_factor(self.step, self.total_steps, train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total_loss = 0.0
        for _ in range(train.grad_accum):
            batch = self.loader.next_batch().to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.forward(**batch.inputs())
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten()) / train.grad_accum
            loss.backward()
            total_loss += loss.item()
        self.step += 1
        self.tokens += self.tokens_per_step
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.clip).item()
            if train.clip is not None
            else math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in self.model.parameters() if p.grad is not None))
        )
        if not (math.isfinite(total_loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_a_row += 1
            return {"step": self.step, "loss": None, "lr": lr, "tokens": self.tokens, "skipped": "non-finite loss or gradient"}
        self.bad_in_a_row = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_balance_biases()
        return {"step": self.step, "loss": total_loss, "lr": lr, "tokens": self.tokens, "grad_norm": grad_norm}

    def _validate(self, documents: list[Document]) -> dict:
        result = bits_per_byte(self.model, self.tokenizer, documents, self.seq_len, self.config.train.batch_size, self.device)
        record = {"step": self.step, "val_bpb": result["bpb"], "val_bytes": result["bytes"]}
        self.metrics.write(record)
        return record

    def _save(self) -> None:
        state = {
            "tokens": self.tokens,
            "loader": self.loader.state_dict(),
            "bad_in_a_row": self.bad_in_a_row,
            "elapsed": self.elapsed,
        }
        save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state, self.config.train.keep_last)

    def _sample(self, max_new: int = 200) -> str:
        first_line = self.valid_documents[0].text.split(b"\n", 1)[0][:48] or b"\n"
        generation = generate(self.model, first_line, max_new, temperature=0.8, top_k=50, seed=0, tokenizer=self.tokenizer)[0]
        # Join bytes before decoding: the prompt may end inside a character the sample completes.
        return (first_line + self.tokenizer.decode(generation.tokens)).decode("utf-8", errors="replace")


def train(config: Config, run_dir: Path, resume: bool = False, quiet: bool = False) -> RunResult:
    """Train ``config`` into ``run_dir`` (or continue it); raises DataError, ConfigError,
    CheckpointError or TrainingError with a one-line message on bad input."""
    return Trainer(config, run_dir, resume, quiet).run()


"""The training loop: data -> model -> AdamW steps, validation in bits per byte, checkpoints.

Nothing model-specific happens here: any config that ``build_model`` accepts trains the same way.
A run directory holds the resolved config, the tokenizer, ``metrics.jsonl`` (one JSON object per
optimiser step and one per validation) and the checkpoints; ``resume=True`` continues the exact run
(same data order, optimiser state and RNG), so 20 + 20 steps equal 40 steps.

Under ``torchrun`` every rank runs this same loop on its rows of each global batch
(``strata.train.distributed``); rank 0 writes the run directory, the metrics and the progress,
all ranks save together (``strata.train.distributed_checkpoint``), and decisions to stop are
taken by all ranks at the same step. Validation and the sample run on every rank alike, since a
sharded (FSDP) model needs every rank for a forward pass.
"""

from __future__ import annotations

import gzip
import math
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from strata.config import Config, config_to_dict
from strata.cost import training_flops
from strata.data import (
    Document,
    StreamLoader,
    TokenLoader,
    build_tokenizer,
    check_vocab_size,
    document_ids,
    load_documents,
    load_tokenizer,
    model_levels,
    pack,
    split_documents,
)
from strata.inference.bpb import bits_per_byte
from strata.inference.generate import generate
from strata.models import build_model
from strata.train.checkpoint import (
    latest_checkpoint,
    load_model_weights,
    restore_rng,
    save_checkpoint,
)
from strata.train.distributed import (
    World,
    lost_peer,
    parallelize,
    resolve_device,
    session,
)
from strata.train.distributed_checkpoint import load_sharded, load_whole, load_whole_weights, save_sharded
from strata.train.entropy import copy_byte_model, uses_entropy_model, with_byte_model
from strata.train.memory import check_training_memory
from strata.train.metrics import MetricsLog, Progress
from strata.train.optim import build_optimizer
from strata.train.runs import from_pretrained, pretrained_tokenizer
from strata.train.step import OptimizerStep, TrainingError


@dataclass
class RunResult:
    run_dir: Path
    step: int
    tokens: int
    val_bpb: float
    gzip_bpb: float
    sample: str
    stopped_early: str | None = None
    rank: int = 0


def prepare_run_dir(run_dir: Path) -> None:
    """Create the run directory and prove it is writable, before any work is done."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise TrainingError(f"{run_dir}: run directory is not writable ({error.strerror})") from None


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
    def __init__(self, config: Config, run_dir: Path, resume: bool = False, quiet: bool = False, world: World | None = None):
        self.world = world or World(device=resolve_device(config.train.device))
        check_training_memory(config, self.world.device, self.world.parallel, self.world.size)  # before any work
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.quiet = quiet or not self.world.is_main
        if self.world.is_main:
            prepare_run_dir(self.run_dir)
        if not resume:
            self._refuse_to_overwrite()
        if uses_entropy_model(config):
            config = with_byte_model(config)  # the run's config names its byte model's architecture
        train = config.train

        # Data first: every bad input is reported before a model is built.
        documents = load_documents(config.data.sources, config.data.text_field)
        self.train_documents, self.valid_documents = split_documents(documents, config.data.valid_fraction)
        self.tokenizer = self._tokenizer(config, resume)
        # A preset's vocab_size is part of its design (embedding and head sizes, FLOPs): a tokenizer
        # that disagrees stops the run rather than silently resizing the model. A pretrained
        # model's embedding may be padded beyond its tokenizer's ids.
        if not (train.init_from and config.model.vocab_size >= self.tokenizer.vocab_size):
            check_vocab_size(config.model.vocab_size, config.data, self.tokenizer.vocab_size)
        self.config = config
        self.seq_len = train.seq_len or config.model.context_length

        self.device = self.world.device
        precision = train.precision if train.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.autocast = precision == "bf16"
        torch.manual_seed(train.seed)  # the same on every rank: every rank builds the same model
        # Under FSDP on meta: parallelize gives each rank storage for its shards only and fills them.
        self.model = build_model(config, device="meta" if self.world.parallel == "fsdp" else self.device)
        # self.model stays the plain module (state, validation, sampling); the step trains through
        # what parallelize returns. Weights from elsewhere come after it: under FSDP the model is on
        # meta until then.
        forward = parallelize(self.model, self.world, train, self.autocast)
        if train.init_from and not resume:
            self._initialise_from(train.init_from)
        elif uses_entropy_model(config) and not resume:  # on resume, the checkpoint holds them
            copy_byte_model(self.model.entropy, config.model.split.model)
        self.optimizer = build_optimizer(self.model, train)  # after FSDP has replaced the parameters
        # A resumed run's weights before its data: an entropy rule's levels come from its byte model.
        checkpoint = self._load_weights() if resume else None

        stream = pack(self.train_documents, self.tokenizer)
        levels = model_levels(self.model, stream)
        if train.carry_state:
            if self.world.distributed:
                raise TrainingError("train.carry_state: carrying a state between windows runs in one process for now")
            self.loader = StreamLoader(stream, self.seq_len, train.batch_size)
        else:
            self.loader = TokenLoader(stream, self.seq_len, train.batch_size, train.seed, levels)
        self.carried = None  # the carried state of train.carry_state, from one window to the next
        self.tokens_per_step = train.batch_size * self.seq_len * train.grad_accum
        flops_per_token, self.flops_per_token = training_flops(config.model, self.seq_len, levels)
        self.total_steps = plan_steps(config, self.tokens_per_step, flops_per_token)
        self.optimizer_step = OptimizerStep(self.model, forward, self.optimizer, train, self.total_steps, self.world,
                                            self.autocast)

        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        if resume:
            self._restore(checkpoint)
        elif self.world.is_main:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.config), sort_keys=False))
            self.tokenizer.save(self.run_dir)
        self.metrics = MetricsLog(self.run_dir, truncate_after=self.step) if self.world.is_main else None

    def _refuse_to_overwrite(self) -> None:
        if (self.run_dir / "checkpoints").exists() and any((self.run_dir / "checkpoints").iterdir()):
            raise TrainingError(
                f"{self.run_dir}: already holds checkpoints; continue it with --resume {self.run_dir} or choose another --out"
            )

    def _initialise_from(self, source: str) -> None:
        """The weights of ``train.init_from`` in place of the random ones (fine-tuning), once the
        model is parallelised: under FSDP every rank reads them whole and keeps its shards."""
        pretrained = from_pretrained(source, dtype=torch.float32)
        load = load_whole_weights if self.world.parallel == "fsdp" else load_model_weights
        load(self.model, pretrained.model.state_dict(), pretrained.checkpoint)

    def _tokenizer(self, config: Config, resume: bool):
        """The run's own tokenizer on resume; the pretrained model's for a run that starts from one
        (``train.init_from``); else a new one. Under torchrun rank 0 builds it and the others read
        it back, rather than each training a BPE and trusting it to match."""
        if resume and (self.run_dir / "tokenizer.json").exists():
            return load_tokenizer(self.run_dir)
        if config.train.init_from:
            return pretrained_tokenizer(config.train.init_from)
        if not self.world.distributed:
            return build_tokenizer(config.data, self.train_documents)
        if self.world.is_main:
            build_tokenizer(config.data, self.train_documents).save(self.run_dir)
        self.world.barrier()
        return load_tokenizer(self.run_dir)

    def _load_weights(self):
        """The newest checkpoint's weights and optimiser state into the model and optimiser; the
        checkpoint, for ``_restore``."""
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            raise TrainingError(f"{self.run_dir}: no readable checkpoint to resume from")
        # A checkpoint of either kind continues at any number of processes.
        if checkpoint.sharded is not None:
            load_sharded(checkpoint, self.model, self.optimizer, self.world)
        elif self.world.distributed:
            load_whole(checkpoint, self.model, self.optimizer)
        else:
            load_model_weights(self.model, checkpoint.model, checkpoint.path)
            self.optimizer.load_state_dict(checkpoint.optimizer)
        return checkpoint

    def _restore(self, checkpoint) -> None:
        """The rest of the checkpoint's state (``_load_weights`` took the weights): random
        generators, data position, counters, a carried state."""
        restore_rng(checkpoint.rng)
        state = checkpoint.state
        self.loader.load_state_dict(state["loader"])
        if checkpoint.carried is not None:
            self.carried = self.model.carried_state(self.config.train.carry_context or self.seq_len)
            self.carried.load_state_dict(checkpoint.carried, self.device)
        self.step, self.tokens = checkpoint.step, state["tokens"]
        self.optimizer_step.bad_in_a_row, self.elapsed = state["bad_in_a_row"], state["elapsed"]

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
                self._log(record)
                progress.update(self.step, record)
                if reason := self.optimizer_step.stalled:
                    raise TrainingError(f"step {self.step}: {reason}; stopping (checkpoints, if any, are in "
                                        f"{self.run_dir / 'checkpoints'})")
                if self.step % train.eval_every == 0 and self.step < self.total_steps:
                    progress.update(self.step, self._validate(head_of(self.valid_documents, train.eval_bytes)))
                if self.step % train.save_every == 0:
                    self._save()
                out_of_time = train.time_limit is not None and self.elapsed >= train.time_limit
                interrupt, out_of_time = self.world.any(interrupted["flag"], out_of_time)
                if interrupt:
                    stopped_early = "interrupted"
                    break
                if out_of_time:
                    stopped_early = "time limit"
                    break
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            progress.close()
        self._save()
        final = self._validate(self.valid_documents)
        text = self._sample()
        return RunResult(self.run_dir, self.step, self.tokens, final["val_bpb"], gzip_bits_per_byte(self.valid_documents), text,
                         stopped_early, self.world.rank)

    def _train_step(self) -> dict:
        def next_micro_batch():
            starts_lanes = getattr(self.loader, "starts_lanes", False)
            batch = self.loader.next_batch(self.world.rank, self.world.size).to(self.device)
            inputs = batch.inputs()
            if self.config.data.document_masking:
                inputs["segment_ids"] = document_ids(inputs["tokens"], self.tokenizer.bos_id)
            if self.config.train.carry_state:
                inputs["state"] = self._carried_state(starts_lanes)
            return inputs, batch.targets

        outcome = self.optimizer_step(next_micro_batch, self.step)
        self.step += 1
        self.tokens += self.tokens_per_step
        return {"step": self.step, **outcome.record(), "tokens": self.tokens}

    def _carried_state(self, fresh: bool):
        """The state the next window continues from: the previous window's, detached (truncated
        backpropagation), or a new one where the lanes start again."""
        if fresh or self.carried is None:
            self.carried = self.model.carried_state(self.config.train.carry_context or self.seq_len)
        return self.carried.detach()

    def _validate(self, documents: list[Document]) -> dict:
        result = bits_per_byte(self.model, self.tokenizer, documents, self.seq_len, self.config.train.batch_size, self.device)
        record = {"step": self.step, "val_bpb": result["bpb"], "val_bytes": result["bytes"]}
        self._log(record)
        return record

    def _log(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def _save(self) -> None:
        state = {
            "tokens": self.tokens,
            "loader": self.loader.state_dict(),
            "bad_in_a_row": self.optimizer_step.bad_in_a_row,
            "elapsed": self.elapsed,
        }
        keep_last = self.config.train.keep_last
        if self.world.distributed:
            save_sharded(self.run_dir, self.step, self.model, self.optimizer, state, keep_last, self.world)
        else:
            carried = self.carried.state_dict() if self.carried is not None else None
            save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state, keep_last, carried)

    def _sample(self, max_new: int = 200) -> str:
        first_line = self.valid_documents[0].text.split(b"\n", 1)[0][:48] or b"\n"
        generation = generate(self.model, first_line, max_new, temperature=0.8, top_k=50, seed=0, tokenizer=self.tokenizer)[0]
        # Join bytes before decoding: the prompt may end inside a character the sample completes.
        return (first_line + self.tokenizer.decode(generation.tokens)).decode("utf-8", errors="replace")


def train(config: Config, run_dir: Path, resume: bool = False, quiet: bool = False) -> RunResult:
    """Train ``config`` into ``run_dir`` (or continue it), in this process or, under torchrun, in
    all of them; raises DataError, ConfigError, CheckpointError or TrainingError with a one-line
    message on bad input, or when the run lost one of its processes."""
    with session(config.train) as world:
        if not world.distributed:
            return Trainer(config, run_dir, resume, quiet, world).run()
        hint = f"continue from the last complete checkpoint with --resume {run_dir}"

        def on_terminate(signum, frame):
            raise TrainingError(f"rank {world.rank}: terminated (torchrun stops every process of a run when one fails, "
                                f"as schedulers stop jobs); {hint}")

        previous_handler = signal.signal(signal.SIGTERM, on_terminate)
        try:
            return Trainer(config, run_dir, resume, quiet, world).run()
        except BaseException as error:  # DCP raises its CheckpointException, a BaseException
            if not lost_peer(error):
                raise
            # gloo's message opens with its source position and closes with generic advice.
            reason = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().splitlines()[0]).split(". ")[0][:160]
            raise TrainingError(f"rank {world.rank}: lost contact with another process of the run ({reason}); {hint}") from None
        finally:
            signal.signal(signal.SIGTERM, previous_handler)

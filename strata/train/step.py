"""One optimiser step, the same for every training loop (``strata train``, the MQAR trainer).

A step sets the learning rate from the schedule, runs ``train.grad_accum`` micro-batches
(gradients reduced over the ranks after the last one only; bf16 autocast on a GPU), clips the
whole gradient to ``train.clip``, skips the update when the loss or the gradient is not finite
(``train.max_bad_steps`` in a row make ``stalled`` true: the loop stops there), steps AdamW, and moves the MoE experts' balance
biases from the token counts of every rank. What a loop feeds it, and when it stops, is the loop's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from strata.config import TrainConfig
from strata.train.distributed import World, clip_gradients, gradient_sync, sync_expert_loads
from strata.train.optim import learning_rate_factor

# A micro-batch: the model's keyword inputs (``tokens``, and ``levels`` for an AU-Net) and the
# target ids, -100 where no loss is taken (F.cross_entropy's ignore_index).
MicroBatch = tuple[dict[str, torch.Tensor], torch.Tensor]


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite training, a lost process, a run directory in the way)."""


@dataclass
class StepOutcome:
    lr: float
    loss: float | None  # the mean over micro-batches and ranks; None when the update was skipped
    grad_norm: float | None
    # An AU-Net with learned splits: per stage 2..S, the share of the finer stage's positions that
    # split (forced splits aside) in the last micro-batch.
    split_rates: list[float] | None = None

    def record(self) -> dict:
        """The fields this step adds to a metrics line."""
        if self.loss is None:
            return {"loss": None, "lr": self.lr, "skipped": "non-finite loss or gradient"}
        learned = {} if self.split_rates is None else {"split_rates": self.split_rates}
        return {"loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm, **learned}


class OptimizerStep:
    """``step(next_micro_batch, position)`` takes one optimiser step at ``position`` (0-based) of
    ``total_steps`` in the schedule. ``forward`` is what computes the training logits (the model,
    or its DDP/FSDP/compiled form from ``parallelize``); ``model`` the plain module beneath."""

    def __init__(self, model: nn.Module, forward: nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig,
                 total_steps: int, world: World | None = None, autocast: bool = False):
        self.model, self.forward, self.optimizer = model, forward, optimizer
        self.train, self.total_steps = train, total_steps
        self.world = world or World()
        self.autocast = autocast
        self.bad_in_a_row = 0  # part of a run's state: saved in its checkpoints

    @property
    def stalled(self) -> str | None:
        """Why the run must stop, once ``train.max_bad_steps`` updates in a row were skipped."""
        if self.bad_in_a_row >= self.train.max_bad_steps:
            return f"loss or gradient non-finite for {self.bad_in_a_row} steps in a row"
        return None

    def __call__(self, next_micro_batch: Callable[[], MicroBatch], position: int) -> StepOutcome:
        train = self.train
        lr = train.lr * learning_rate_factor(position, self.total_steps, train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total_loss = 0.0
        for micro in range(train.grad_accum):
            inputs, targets = next_micro_batch()
            with gradient_sync(self.forward, enabled=micro == train.grad_accum - 1):
                with torch.autocast(self.world.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    logits = self.forward(**inputs)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()) / train.grad_accum
                auxiliary = getattr(self.model, "auxiliary_loss", lambda: None)()  # not in the loss reported
                (loss if auxiliary is None else loss + auxiliary / train.grad_accum).backward()
            total_loss += loss.item()
        # The mean over ranks is the global batch's loss: every rank has the same number of rows.
        total_loss = self.world.mean(total_loss)
        grad_norm = clip_gradients(list(self.model.parameters()), train.clip)
        if not (math.isfinite(total_loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_a_row += 1
            return StepOutcome(lr, None, None)
        self.bad_in_a_row = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync_expert_loads(self.model, self.world)
        self.model.update_balance_biases()
        rates = getattr(self.model, "split_rates", None)
        return StepOutcome(lr, total_loss, grad_norm, [round(float(rate), 4) for rate in rates] if rates else None)

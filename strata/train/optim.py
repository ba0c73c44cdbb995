"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from strata.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the weight matrices; leave norms, biases, per-head SSM parameters and embeddings alone.

    Decaying an embedding pulls rare tokens to zero, and decaying A_log, dt_bias or D would drag the
    SSM's decay rates and skip away from their careful initialisation.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        is_matrix = parameter.dim() >= 2 and id(parameter) not in embeddings
        (decay if is_matrix else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.lr, betas=config.betas, eps=config.eps
    )


def learning_rate_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """Multiplier of the peak LR at optimiser step ``step`` (0-based) of ``total_steps``.

    ``wsd``: linear warmup, constant, then linear decay to ``min_lr_ratio`` over the last ``decay``
    fraction (warmup–stable–decay, the paper's schedule); ``cosine``: warmup then cosine to
    ``min_lr_ratio``; ``constant``: warmup then flat.
    """
    warmup = round(config.warmup * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    floor = config.min_lr_ratio
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_steps = round(config.decay * total_steps)
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = (step - decay_start + 1) / max(1, decay_steps)
    return 1.0 - (1.0 - floor) * min(1.0, progress)

"""Training tiny models on MQAR (``strata.evals.mqar``): same-size attention, Mamba-2, inter- and
intra-layer hybrid models, and a short AdamW loop on freshly drawn batches.

The recipe (``RECIPE``, ``LEARNING_RATES``, ``mqar_recipe``) follows Zoology's MQAR setting scaled
to a 2-core CPU: two blocks of width 64 with no FFN (the mixers alone do the recall), the 256 byte
ids as the task's vocabulary, and batches whose pair count cycles through several values, so a
model learns recall rather than one fixed layout of the sequence.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from strata.config import ModelConfig, TrainConfig
from strata.data.levels import model_inputs
from strata.evals.mqar import MQAR_VOCAB, check_mqar, draw_mqar, score_recall
from strata.models import build_model
from strata.train.distributed import World, parallelize
from strata.train.optim import build_optimizer
from strata.train.step import OptimizerStep, TrainingError

FAMILIES = ("attention", "mamba2", "inter", "intra")

# The acceptance run's recipe (benchmarks/mqar.py), found on a shared 2-core CPU: every family at
# width 64, 2 blocks, heads of 16, length 64, batches of 32 whose pair count cycles 4, 8, 16. With
# heads of 32 and batches of 64, attention had learnt nothing after 2,000 steps; with these, 87 %.
# Recall comes suddenly, after a plateau whose length varies with the seed; 8,000 steps (about
# 9 minutes for a hybrid on one idle core, so usually cut short by a 10-minute limit) leave room
# for a late start: the inter hybrid's seed 2 sat at 21 % for 3,500 steps, then reached 100 %.
RECIPE = {
    "d_model": 64,
    "n_layers": 2,
    "head_dim": 16,
    "seq_len": 64,
    "n_pairs": (4, 8, 16),
    "batch_size": 32,
    "steps": 8000,
}
# Peak learning rates per family (recall at 16 pairs after ~2,000 steps): attention 6 % at 1e-2,
# 87 % at 3e-3, 89 % at 5e-3 (in 1,800 steps). Models with Mamba-2 blocks want 1e-2: an MA hybrid
# had 5 % at 3e-3 after 2,000 steps, 96 % at 1e-2; after 4,000 steps at 5e-3 MA had 59 % and 18 %
# (two seeds), AM 21 %, where 1e-2 gave AM 99 %.
LEARNING_RATES = {"attention": 5e-3, "mamba2": 1e-2, "inter": 1e-2, "intra": 1e-2}


def mqar_recipe(family: str) -> dict:
    """The keyword arguments of ``train_mqar`` that the recipe gives ``family``."""
    if family not in LEARNING_RATES:
        raise ValueError(f"unknown MQAR family {family!r}; known: {', '.join(FAMILIES)}")
    return {"seq_len": RECIPE["seq_len"], "n_pairs": RECIPE["n_pairs"], "steps": RECIPE["steps"],
            "batch_size": RECIPE["batch_size"], "lr": LEARNING_RATES[family]}


def mqar_layout(family: str, n_layers: int) -> str:
    """The layout of a family at ``n_layers`` blocks; each hybrid has one special block.

    Recall takes two steps: tie each key to the value after it, then find the asked key. The
    inter hybrid puts its attention block first (``AM``), where it can copy each key into the
    next position for the Mamba-2 block above to store and look up: in 4,000-step runs of three
    seeds it recalled 99 %, 97 % and 45 % at 16 pairs, the other order (``MA``) 5 %, 90 % and 76 %.
    (The hybrid paper's "never attention first" is about language modelling.) The intra hybrid's
    block goes on top (``MH``), where its attention branch can look up what the Mamba-2 block
    below tied together; it reached 92 % in 4,000 steps.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be at least 1, got {n_layers}")
    layouts = {"attention": "A" * n_layers, "mamba2": "M" * n_layers,
               "inter": "A" + "M" * (n_layers - 1), "intra": "M" * (n_layers - 1) + "H"}
    if family not in layouts:
        raise ValueError(f"unknown MQAR family {family!r}; known: {', '.join(FAMILIES)}")
    return layouts[family]


def mqar_model_config(family: str, d_model: int = RECIPE["d_model"], n_layers: int = RECIPE["n_layers"],
                      vocab_size: int = MQAR_VOCAB, context_length: int = 2 * RECIPE["seq_len"],
                      d_state: int = 32, head_dim: int = RECIPE["head_dim"], d_ffn: int = 0) -> ModelConfig:
    """A language model of ``family`` (``FAMILIES``) for MQAR; every family gets the same width and depth.

    Attention: heads of ``head_dim``, as many KV heads (no grouping at this size). Mamba-2: expansion
    2, ``d_state``, SSM heads of ``head_dim``. Intra-layer hybrid: the Mamba-2 block's 2·d_model
    channels split evenly, d_model of attention (Q/K and values) and d_model of SSM (the hybrid paper's 1:1
    split), with the final recipe's GroupNorm, difference fusion and separate projections.
    ``d_ffn`` 0 means no FFN, as in Zoology's MQAR models.
    """
    if d_model % head_dim:
        raise ValueError(f"head_dim ({head_dim}) must divide d_model ({d_model})")
    heads = d_model // head_dim
    rope = {"theta": 10_000.0}
    chunk = min(64, context_length)
    mamba = {"d_ssm": 2 * d_model, "d_state": d_state, "head_dim": head_dim, "chunk_size": chunk}
    return ModelConfig.model_validate({
        "vocab_size": vocab_size,
        "d_model": d_model,
        "layout": mqar_layout(family, n_layers),
        "context_length": context_length,
        "attention": {"n_heads": heads, "n_kv_heads": heads, "rope": rope},
        "mamba": mamba,
        "hybrid": {
            "attention": {"n_heads": heads, "n_kv_heads": heads, "head_dim": head_dim, "rope": rope},
            "mamba": {**mamba, "d_ssm": d_model},
        },
        "ffn": {"kind": "swiglu", "d_ffn": d_ffn} if d_ffn else {"kind": "none"},
    })


def train_mqar(config: ModelConfig, seq_len: int = RECIPE["seq_len"], n_pairs: int | Sequence[int] = RECIPE["n_pairs"],
               steps: int = RECIPE["steps"], batch_size: int = RECIPE["batch_size"], lr: float = LEARNING_RATES["attention"],
               seed: int = 0, time_limit: float | None = None, vocab_size: int = MQAR_VOCAB,
               weight_decay: float = 0.1, warmup: float = 0.05, clip: float | None = 1.0, grad_accum: int = 1,
               compile: bool = False, eval_every: int = 250, eval_examples: int = 256,
               callback: Callable[[dict], None] | None = None) -> tuple[torch.nn.Module, list[dict]]:
    """Train a model built from ``config`` on MQAR; return (model, history).

    Each step draws a fresh batch of ``batch_size`` sequences of ``seq_len`` whose pair count is
    the next of ``n_pairs`` in turn (one count if an int; ``grad_accum`` batches a step). Loss:
    cross-entropy at the query positions only. Each step is the trainer's (``strata.train.step``):
    AdamW with decay on matrices only, clipping at ``clip``, a skipped update on a non-finite loss
    or gradient, MoE balancing, ``compile`` per block; cosine schedule with ``warmup``. The run stops after ``steps`` steps, or when another step and
    evaluation as long as the last ones would end past ``time_limit`` seconds from the call (the
    model's construction included); with a time limit the schedule follows the larger of the two
    fractions done, so a run cut short by the clock still cools down instead of ending at its peak.

    Every ``eval_every`` steps and after the last, recall at ``seq_len`` with the largest pair count
    on ``eval_examples`` held-out sequences goes into the history. History: one dict per step
    (``step``, ``loss``, ``lr``, ``grad_norm``, ``time`` in seconds since the call, and ``recall``
    on evaluated steps); ``callback`` receives each as it is made.
    """
    counts = [n_pairs] if isinstance(n_pairs, int) else list(n_pairs)
    if not counts:
        raise ValueError("n_pairs must be a pair count or a non-empty list of them")
    for count in counts:
        check_mqar(seq_len, count, vocab_size)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if time_limit is not None and time_limit <= 0:
        raise ValueError(f"time_limit must be positive seconds, got {time_limit}")
    if seq_len > config.context_length:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context_length {config.context_length}")
    start = time.perf_counter()
    settings = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule="cosine",
                           warmup=warmup, seed=seed, clip=clip, grad_accum=grad_accum, compile=compile)
    torch.manual_seed(seed)
    model = build_model(config)
    optimizer = build_optimizer(model, settings)
    optimizer_step = OptimizerStep(model, parallelize(model, World(), settings, bf16=False), optimizer, settings, steps)
    # Streams apart from evaluate_mqar's: numpy seeds [s, 0] like the integer s, but [s, 1] and
    # [s, 2] like no integer below 2**32.
    rng = np.random.default_rng([seed, 1])
    held_out = draw_mqar(np.random.default_rng([seed, 2]), eval_examples, seq_len, max(counts), vocab_size)
    pair_cycle = itertools.cycle(counts)

    def next_micro_batch():
        tokens, targets = draw_mqar(rng, batch_size, seq_len, next(pair_cycle), vocab_size)
        return {"tokens": tokens, **model_inputs(model, tokens)}, targets  # targets are IGNORE but at queries

    history: list[dict] = []
    eval_seconds = 0.0  # the last evaluation's, kept free at the end of a timed run
    for step in range(steps):
        step_start = time.perf_counter() - start
        progress = step if time_limit is None else max(step, int(steps * step_start / time_limit))
        outcome = optimizer_step(next_micro_batch, min(progress, steps - 1))
        elapsed = time.perf_counter() - start
        record = {"step": step + 1, **outcome.record(), "time": elapsed}
        next_step_end = elapsed + (elapsed - step_start)
        last = step + 1 == steps or (time_limit is not None and next_step_end + eval_seconds > time_limit)
        if last or (step + 1) % eval_every == 0:
            record["recall"] = score_recall(model, *held_out, vocab_size=vocab_size).mean().item()
            eval_seconds = time.perf_counter() - start - elapsed
        history.append(record)
        if callback is not None:
            callback(record)
        if reason := optimizer_step.stalled:
            raise TrainingError(f"MQAR step {step + 1}: {reason}")
        if last:
            break
    model.eval()
    return model, history

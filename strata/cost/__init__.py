"""The cost model: parameters, FLOPs and inference cache of every model kind (an AU-Net's measured
contraction included), and what ``strata info`` prints. A bottom layer: it imports only config,
layout and data, so the trainer can price its own steps."""

from __future__ import annotations

import numpy as np

from strata.config import AUNetConfig, ModelConfig
from strata.cost.aunet import aunet_cost, contraction_of_levels
from strata.cost.model import model_cost


def training_flops(config: ModelConfig | AUNetConfig, context: int, levels: np.ndarray | None = None) -> tuple[float, float]:
    """(FLOPs per token, the same with the output head) of training at ``context``; for an AU-Net
    a token is a byte, and its stage contraction is measured on ``levels``, the split levels of
    the training stream (``strata.data.levels``; the learned rule's splits are not in them, and
    its targets count instead)."""
    if isinstance(config, AUNetConfig):
        measurable = levels is not None and config.split.rule != "learned"
        contraction = contraction_of_levels(levels, config.n_stages) if measurable else None
        cost = aunet_cost(config, context, "fp32", contraction)
        return cost.flops_per_byte, cost.flops_per_byte_with_head
    cost = model_cost(config, context, "fp32")
    return cost.flops_per_token, cost.flops_per_token_with_head

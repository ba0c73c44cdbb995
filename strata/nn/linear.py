"""Calling a projection without going through ``nn.Module.__call__``, where that changes nothing.

Decoding one token is a chain of ~30 small ops per block, and module dispatch (hook checks,
attribute lookups) measured ~20 % of such a step on CPU. Mixers keep their projections as
``nn.Linear`` modules (parameter names, initialisation, interop) and apply them with ``project``,
which takes the shortcut only when it is the same computation: outside autograd (decoding,
validation, evaluation), on a plain ``nn.Linear`` with no hooks of its own and no global module
hooks. Training, and any projection wrapped or replaced (LoRA, float8, a tensor-parallel plan's
hooks, a forward hook of the user's), go through the module's ``__call__`` as usual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

# torch's registries of global module hooks, mutated in place when a hook is registered.
_GLOBAL_HOOKS = (_module._global_forward_hooks, _module._global_forward_pre_hooks)


def project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if (type(linear) is nn.Linear and not torch.is_grad_enabled() and not linear._forward_hooks
            and not linear._forward_pre_hooks and not any(_GLOBAL_HOOKS)):
        return F.linear(x, linear.weight, linear.bias)
    return linear(x)

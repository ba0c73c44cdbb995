"""Which implementation a primitive runs: the PyTorch path (the CPU path and every test's oracle)
or a Triton kernel written beside it (``conv_triton``, ...).

``STRATA_KERNELS`` chooses: ``auto`` (the default) takes the Triton kernel for CUDA tensors when
the ``triton`` package imports, and PyTorch otherwise; ``torch`` always PyTorch; ``triton``
always Triton, which on CPU tensors needs Triton's interpreter (``TRITON_INTERPRET=1``, set
before ``triton`` is first imported: the tests run the kernels that way, without a GPU).
"""

from __future__ import annotations

import importlib.util
import os

import torch

CHOICES = ("auto", "torch", "triton")
# Found without importing triton (which takes seconds); a constant to torch.compile.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def choice() -> str:
    value = os.environ.get("STRATA_KERNELS", "auto")
    if value not in CHOICES:
        raise ValueError(f"STRATA_KERNELS={value!r}: expected one of {', '.join(CHOICES)}")
    return value


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether a primitive given ``tensor`` runs its Triton kernel. The kernels are custom
    operators, so a ``torch.compile``d block calls them within its graph as an eager one does."""
    wanted = choice()
    if wanted == "torch":
        return False
    if wanted == "auto":
        return tensor.is_cuda and TRITON_INSTALLED
    if not TRITON_INSTALLED:
        raise RuntimeError("STRATA_KERNELS=triton, but the triton package is not installed (pip install triton)")
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("STRATA_KERNELS=triton on CPU tensors runs Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before triton is imported")
    return True

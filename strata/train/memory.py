"""Memory: what a run needs at the least, against what this machine has, checked before anything is
built, so that a model too large for the machine stops with one line instead of minutes of work
and an out-of-memory kill.

Training keeps, per parameter, fp32 weights, gradients and AdamW's two moments: 16 bytes (bf16
autocast keeps fp32 weights too). Activations come on top, so this is a lower bound: a config
refused here could never have trained on this device, and one that passes may still need more.
Free memory is ``MemAvailable`` of ``/proc/meminfo`` (or ``sysconf`` elsewhere), lowered to the
room left under a cgroup's limit when one is set; on a GPU, what CUDA reports free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from strata.config import AUNetConfig, Config, ConfigError, ModelConfig
from strata.cost.aunet import aunet_cost
from strata.cost.model import model_cost

# fp32 weights, gradients, and AdamW's exp_avg and exp_avg_sq.
TRAINING_BYTES_PER_PARAMETER = 16


@dataclass(frozen=True)
class Available:
    bytes: int
    where: str  # e.g. "available on this machine", "free on cuda:0"


def gib(size: float) -> str:
    return f"{size / 2**30:,.1f} GiB"


def parameter_count(model: ModelConfig | AUNetConfig) -> int:
    """Parameters of the model ``model`` describes, from the cost model (nothing is allocated)."""
    return (aunet_cost(model) if isinstance(model, AUNetConfig) else model_cost(model)).params


def available_memory(device: torch.device) -> Available | None:
    """Memory free for this process on ``device``; None where it cannot be known (mps, xpu)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return Available(free, f"free on {device}")
    if device.type != "cpu":
        return None
    free = _meminfo_available()
    where = "available on this machine"
    limit = _cgroup_room()
    if limit is not None and (free is None or limit < free):
        free, where = limit, "left under this process's cgroup memory limit"
    return Available(free, where) if free is not None else None


def check_training_memory(config: Config, device: torch.device, parallel: str = "none", processes: int = 1) -> None:
    """Raise ConfigError if the weights, gradients and optimiser state of ``config``'s model alone
    need more memory than ``device`` has free. ``parallel="fsdp"`` shards them over ``processes``;
    on a CPU, the processes of this machine (torchrun's LOCAL_WORLD_SIZE) share its memory."""
    params = parameter_count(config.model)
    per_process = params * TRAINING_BYTES_PER_PARAMETER / (processes if parallel == "fsdp" else 1)
    here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    need = per_process * here
    available = available_memory(device)
    if available is None or need <= available.bytes:
        return
    sharing = f", {here} processes on this machine" if here > 1 else ""
    sharded = f" sharded over {processes} processes" if parallel == "fsdp" and processes > 1 else ""
    remedy = ("shard it over more GPUs (train.parallel=fsdp under torchrun)" if device.type == "cuda"
              else "train on a GPU (train.device) or a machine with more memory")
    raise ConfigError(
        f"model: {params:,} parameters need at least {gib(need)} to train on {device}{sharing} "
        f"({TRAINING_BYTES_PER_PARAMETER} bytes each: fp32 weights, gradients and AdamW's two moments{sharded}), "
        f"more than the {gib(available.bytes)} {available.where}; choose a smaller model or {remedy}"
    )


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, else v1); None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 2**60:  # v1 writes "no limit" as a huge number
                return None
            return max(0, int(limit) - int(Path(usage_file).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None

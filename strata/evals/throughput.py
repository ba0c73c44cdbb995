"""Decode throughput of one trained model, on this machine: tokens per second of cached greedy
decoding after a prompt, measured as ``benchmarks/decode.py`` measures it (per-token callbacks,
so the prefill is left out: batch × (new − 1) tokens over the time from the first new token to
the last; the median of ``repeats`` rounds after one warm-up round).

Absolute rates depend on the machine and on whatever else runs on it, so each result says where
it was measured; compare rates measured one after another on one machine (the runs of a sweep).
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from strata.inference.generate import generate


def machine() -> dict:
    """Where a measurement was taken: processor, cores, threads, device, torch version, and the
    1-minute load average (other jobs on the machine slow a measurement down)."""
    info = {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device": "cpu",
            "load_average": os.getloadavg()[0]}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    return info


def decode_throughput(model: torch.nn.Module, prompts: list[list[int]], new: int, repeats: int = 3) -> dict:
    """Greedy decoding of ``new`` tokens after each of ``prompts`` (one batch), ``repeats`` times."""
    if new < 2:
        raise ValueError(f"new must be at least 2 tokens (a rate needs two of them), got {new}")
    rates = []
    for _ in range(repeats + 1):
        stamps: list[float] = []
        generate(model, prompts, new, on_token=lambda index, token: index == 0 and stamps.append(time.perf_counter()))
        rates.append(len(prompts) * (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    rates = rates[1:]  # the first round warms up allocators and caches
    return {"tokens_per_s": statistics.median(rates), "rounds": rates, "batch": len(prompts),
            "context": len(prompts[0]), "new": new, "machine": machine()}


def throughput_markdown(result: dict) -> str:
    where = result["machine"]
    return (f"Decode: **{result['tokens_per_s']:,.1f} tokens/s** (median of {len(result['rounds'])}), batch "
            f"{result['batch']}, {result['new']} new tokens after {result['context']:,} prompt tokens, greedy, cached.\n\n"
            f"Measured on this machine: {where['processor']}, {where['device']}, {where['threads']} threads, "
            f"torch {where['torch']}, load average {where['load_average']:.1f}; compare only with runs measured on the "
            "same machine.")

"""The GPU benchmark: one short command that a session lent a GPU runs as it is.

    python benchmarks/gpu.py [--out gpu-results] [--budget-s 450] [--no-compile] [--toy]

(``--no-compile``: nothing compiled, neither the training blocks nor the scans' reference path.)

Three sections, each timed after a warm-up with the device synchronised; the scans and decode
run first and the training presets last, and a job that would start after ``--budget-s`` seconds
is skipped and named, so the whole run stays inside the 8 minutes the device tool allows:

1. **Training MFU**: the 100M and 350M presets of llama, mamba2, inter and intra
   (``configs/paper``), random weights, trained as ``strata train`` trains on one device (a
   meta-device build, ``parallelize``: each block compiled, ``--no-compile``: eager; bf16
   autocast; the Mamba-2 scans and convolutions through the Triton kernels, STRATA_KERNELS's default
   on CUDA, called from the compiled blocks as custom operators), 8K context, fused AdamW; the largest batch of 32, 16, 8, 4, 2, 1 that fits. MFU = the cost model's training FLOPs per token (output head
   included) × tokens/s over the GPU's dense bf16 peak from its datasheet (H100 SXM/H200:
   989 TFLOP/s; H100 PCIe: 756), and over the bf16 matmul peak measured here.
2. **Scans**: ``ssd_chunked`` at the 350M presets' Mamba-2 shapes (batch 4, 8K, 32 heads of 64,
   state 128, chunks of 256, bf16 inputs) and ``gated_delta_chunked`` at a Gated DeltaNet's
   (batch 4, 8K, 16 heads of 128, chunks of 64): forward + backward, eager and through
   ``torch.compile`` (both with ``STRATA_KERNELS=torch``) and as the Triton kernels
   (``strata.nn.ssd_triton``, ``strata.nn.delta_rule_triton``); then the forward alone, the
   same three ways.
3. **Decode** (the hybrid paper's Table 13 protocol): the 1B llama, inter and intra presets,
   random weights, bf16, batch 4, at total lengths 2K-32K: a prompt of the length less 64
   tokens is prefilled, then 64 greedy steps are timed; tokens/s = 4 × 63 / their time.

It writes ``OUT/gpu.json`` (every figure and the device) and ``OUT/gpu.md`` (the tables for
BENCHMARKS.md). ``--toy`` runs the same code on the CPU with the tiny presets, short contexts and
float32, so the script is tested without a GPU (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from strata import build_model, load_config
from strata.cost.model import model_cost
from strata.inference import model_cache
from strata.nn.kernels import TRITON_INSTALLED
from strata.nn.kernels import choice as kernels_choice
from strata.nn.delta_rule import gated_delta_chunked
from strata.nn.ssd import ssd_chunked
from strata.train.distributed import World, parallelize

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks from the datasheets (no sparsity), by a word of the device's name.
DATASHEET_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
FAMILIES = ("llama", "mamba2", "inter", "intra")


@dataclass
class Setting:
    device: torch.device
    dtype: torch.dtype
    context: int
    batches: tuple[int, ...]
    train_presets: list[tuple[str, Path, list[str]]]
    decode_presets: list[tuple[str, Path, list[str]]]
    decode_lengths: tuple[int, ...]
    decode_steps: int
    ssd_shape: dict
    delta_shape: dict


def setting(toy: bool) -> Setting:
    if toy:
        tiny = {"llama": "transformer", "mamba2": "mamba2", "inter": "inter", "intra": "intra"}
        presets = [(f"tiny {name}", ROOT / f"configs/tiny/{tiny[name]}.yaml", ["model.context_length=256"]) for name in FAMILIES]
        return Setting(torch.device("cpu"), torch.float32, 128, (4, 2, 1), presets, presets[0:1] + presets[2:],
                       (96, 160), 8, {"batch": 1, "seq": 128, "heads": 4, "head_dim": 16, "state": 16, "chunk": 32},
                       {"batch": 1, "seq": 128, "heads": 2, "head_dim": 16, "chunk": 32})
    paper = ROOT / "configs/paper"
    train = [(f"{name}-{size}", paper / f"{name}-{size}.yaml", []) for size in ("100m", "350m") for name in FAMILIES]
    decode = [(f"{name}-1b", paper / f"{name}-1b.yaml", ["model.context_length=32768"]) for name in ("llama", "inter", "intra")]
    return Setting(torch.device("cuda"), torch.bfloat16, 8192, (32, 16, 8, 4, 2, 1), train, decode,
                   (2048, 4096, 8192, 16384, 32768), 64,
                   {"batch": 4, "seq": 8192, "heads": 32, "head_dim": 64, "state": 128, "chunk": 256},
                   {"batch": 4, "seq": 8192, "heads": 16, "head_dim": 128, "chunk": 64})


class Clock:
    """Wall time of a region, synchronised with the device."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, work, repeats: int) -> float:
        """Seconds per call of ``work``, after one warm-up call."""
        work()
        self.sync()
        start = time.perf_counter()
        for _ in range(repeats):
            work()
        self.sync()
        return (time.perf_counter() - start) / repeats


def matmul_peak(s: Setting, clock: Clock) -> float:
    size = 8192 if s.device.type == "cuda" else 1024
    a = torch.randn(size, size, device=s.device, dtype=s.dtype)
    b = torch.randn(size, size, device=s.device, dtype=s.dtype)
    return 2 * size**3 / clock.time(lambda: a @ b, 10)


def datasheet_peak(s: Setting) -> float | None:
    if s.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(s.device)
    return next((peak for word, peak in DATASHEET_BF16.items() if word in name), None)


def oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def training_row(s: Setting, clock: Clock, name: str, path: Path, overrides: list[str], compile_blocks: bool,
                 peaks: dict) -> dict:
    """The preset trained as ``strata train`` trains it on one device (a meta-device build, then
    ``parallelize``: each block compiled unless told not to; bf16 autocast on a GPU): the largest
    batch that fits is found eagerly (compiled blocks take less memory, so it fits them too),
    then the steps are timed."""
    batch = None
    for size in s.batches:
        model, step = _training(s, path, overrides, compile_blocks=False)
        try:
            step(torch.randint(0, model.config.vocab_size, (size, s.context + 1), device=s.device))
            clock.sync()
            batch = size
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not oom(error):
                raise
        del model, step
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
        if batch is not None:
            break
    if batch is None:
        return {"section": "training", "model": name, "not_run": f"no batch of {s.batches} fits at {s.context} tokens"}
    model, step = _training(s, path, overrides, compile_blocks)
    tokens = torch.randint(0, model.config.vocab_size, (batch, s.context + 1), device=s.device)
    step(tokens)  # compiles
    seconds = clock.time(lambda: step(tokens), 3)
    tokens_per_s = batch * s.context / seconds
    flops = model_cost(model.config, s.context, "bf16").flops_per_token_with_head * tokens_per_s
    kernels = "triton" if s.device.type == "cuda" and TRITON_INSTALLED and kernels_choice() != "torch" else "torch"
    row = {"section": "training", "model": name, "batch": batch, "context": s.context, "compiled": compile_blocks,
           "kernels": kernels,
           "step_s": seconds, "tokens_per_s": tokens_per_s, "flops_per_s": flops, "mfu_measured_peak": flops / peaks["measured"]}
    if peaks.get("datasheet"):
        row["mfu"] = flops / peaks["datasheet"]
    return row


def _training(s: Setting, path: Path, overrides: list[str], compile_blocks: bool):
    """(the model, one training step of it on a batch of token rows)."""
    config = load_config(path, [*overrides, f"train.compile={str(compile_blocks).lower()}"])
    torch.manual_seed(0)
    model = build_model(config, device="meta")
    forward = parallelize(model, World(device=s.device), config.train, bf16=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=s.device.type == "cuda")

    def step(tokens):
        with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.device.type == "cuda"):
            logits = forward(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def scan_rows(s: Setting, clock: Clock, compile_paths: bool) -> list[dict]:
    """The SSD scan and the gated delta rule, each forward + backward and forward alone, eager and
    compiled PyTorch (STRATA_KERNELS=torch; compiled unless ``compile_paths`` is false) against
    the Triton kernels (on CUDA)."""
    generator = torch.Generator(device=s.device).manual_seed(0)

    def tensor(*size, scale=1.0):
        return (torch.randn(*size, device=s.device, generator=generator) * scale).to(s.dtype).requires_grad_()

    shape = s.ssd_shape
    b, t, h, p, n = shape["batch"], shape["seq"], shape["heads"], shape["head_dim"], shape["state"]
    x, dt = tensor(b, t, h, p), tensor(b, t, h, scale=0.5)
    A = (-torch.rand(h, device=s.device, generator=generator)).requires_grad_()
    B, C, D = tensor(b, t, 1, n), tensor(b, t, 1, n), tensor(h)
    rows = _timed_paths(s, clock, compile_paths, "ssd", shape, ssd_chunked,
                        lambda scan: scan(x, F.softplus(dt), A, B, C, shape["chunk"], D)[0])

    shape = s.delta_shape
    b, t, h, k = shape["batch"], shape["seq"], shape["heads"], shape["head_dim"]
    q, keys, v = (tensor(b, t, h, k) for _ in range(3))
    g, beta = tensor(b, t, h), tensor(b, t, h)

    def rule(scan):
        return scan(F.normalize(q.float(), dim=-1).to(s.dtype) * k**-0.5, F.normalize(keys.float(), dim=-1).to(s.dtype), v,
                    -F.softplus(g), torch.sigmoid(beta), shape["chunk"])[0]

    return rows + _timed_paths(s, clock, compile_paths, "delta rule", shape, gated_delta_chunked, rule)


def _timed_paths(s: Setting, clock: Clock, compile_paths: bool, section: str, shape: dict, function, call) -> list[dict]:
    """``call(function)``'s output, timed forward + backward and forward alone, each way; the
    ratios are to the compiled PyTorch path, or to the eager one when nothing is compiled."""
    paths = [("PyTorch (eager)", "torch", function)]
    if compile_paths:
        paths.append(("PyTorch (torch.compile)", "torch", torch.compile(function)))
    reference = paths[-1][0]
    if s.device.type == "cuda" and TRITON_INSTALLED:
        paths.append(("Triton", "triton", function))

    def both(scan):
        return lambda: call(scan).float().sum().backward()

    def forward_only(scan):
        def work():
            with torch.no_grad():
                call(scan)
        return work

    rows = []
    for label, work in (("forward + backward", both), ("forward", forward_only)):
        times = {}
        for name, kernels, scan in paths:
            with kernels_chosen(kernels):
                times[name] = clock.time(work(scan), 5)
        rows += [{"section": "scan", "primitive": section, "pass": label, "path": name, **shape, "ms": seconds * 1e3,
                  "reference": reference, "vs_reference": times[reference] / seconds} for name, seconds in times.items()]
    return rows


@contextlib.contextmanager
def kernels_chosen(value: str):
    """STRATA_KERNELS set to ``value`` for the block (``strata.nn.kernels`` reads it at each call)."""
    before = os.environ.get("STRATA_KERNELS")
    os.environ["STRATA_KERNELS"] = value
    try:
        yield
    finally:
        os.environ.pop("STRATA_KERNELS") if before is None else os.environ.update(STRATA_KERNELS=before)


def decode_rows(s: Setting, clock: Clock, name: str, path: Path, overrides: list[str]) -> list[dict]:
    config = load_config(path, overrides).model
    torch.manual_seed(0)
    model = build_model(config, device=s.device).to(s.dtype).eval()
    rows, batch = [], 4
    with torch.inference_mode():
        for total in s.decode_lengths:
            prompt = torch.randint(0, config.vocab_size, (batch, total - s.decode_steps), device=s.device)
            try:
                cache = model_cache(model, batch, total)
                logits = model(prompt, cache, last_only=True)
                token = logits[:, -1].argmax(-1, keepdim=True)
                model(token, cache)  # the first step builds what later steps reuse
                clock.sync()
                start = time.perf_counter()
                for _ in range(s.decode_steps - 1):
                    token = model(token, cache)[:, -1].argmax(-1, keepdim=True)
                clock.sync()
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not oom(error):
                    raise
                rows.append({"section": "decode", "model": name, "total": total, "not_run": "out of memory"})
                break
            rate = batch * (s.decode_steps - 1) / (time.perf_counter() - start)
            rows.append({"section": "decode", "model": name, "batch": batch, "total": total, "tokens_per_s": rate})
            del cache
    return rows


def markdown(device: str, peaks: dict, rows: list[dict], skipped: list[str]) -> str:
    lines = [f"Device: {device}. Matmul peak measured ({peaks['dtype']}): {peaks['measured'] / 1e12:.2f} TFLOP/s"
             + (f"; datasheet {peaks['datasheet'] / 1e12:.0f} TFLOP/s." if peaks.get("datasheet") else "."), ""]
    training = [row for row in rows if row["section"] == "training"]
    if training:
        lines += ["| model | batch × context | compiled | kernels | tokens/s | MFU (datasheet) | MFU (measured peak) |",
                  "|---|---|---|---|---:|---:|---:|"]
        for row in training:
            if "not_run" in row:
                lines.append(f"| {row['model']} | {row['not_run']} | | | | | |")
                continue
            mfu = f"{row['mfu']:.1%}" if "mfu" in row else "n/a"
            lines.append(f"| {row['model']} | {row['batch']} × {row['context']} | {row['compiled']} | {row['kernels']} | "
                         f"{row['tokens_per_s']:,.0f} | {mfu} | {row['mfu_measured_peak']:.1%} |")
        lines.append("")
    scans = [row for row in rows if row["section"] == "scan"]
    if scans:
        lines += [f"| scan | pass | path | ms | vs {scans[0]['reference']} |", "|---|---|---|---:|---:|"]
        lines += [f"| {row['primitive']} | {row['pass']} | {row['path']} | {row['ms']:.2f} | {row['vs_reference']:.2f}× |"
                  for row in scans]
        lines.append("")
    decode = [row for row in rows if row["section"] == "decode"]
    if decode:
        totals = sorted({row["total"] for row in decode})
        lines += ["| decode tokens/s, batch 4 | " + " | ".join(f"{total:,}" for total in totals) + " |",
                  "|---|" + "---:|" * len(totals)]
        for model in dict.fromkeys(row["model"] for row in decode):
            cells = {row["total"]: row for row in decode if row["model"] == model}
            lines.append(f"| {model} | " + " | ".join(
                f"{cells[t]['tokens_per_s']:,.0f}" if t in cells and "tokens_per_s" in cells[t] else "—" for t in totals) + " |")
        lines.append("")
    lines += [f"Skipped (time budget): {', '.join(skipped)}."] if skipped else []
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-results"))
    parser.add_argument("--budget-s", type=float, default=450.0)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--toy", action="store_true", help="the tiny presets on the CPU, in float32")
    args = parser.parse_args()
    if not args.toy and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --toy to exercise the script on the CPU")
    started = time.perf_counter()
    s = setting(args.toy)
    clock = Clock(s.device)
    device = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else (platform.processor() or platform.machine())
    peaks = {"measured": matmul_peak(s, clock), "datasheet": datasheet_peak(s), "dtype": str(s.dtype).removeprefix("torch.")}
    print(f"{device}, torch {torch.__version__}; matmul peak {peaks['measured'] / 1e12:.2f} TFLOP/s", flush=True)
    rows, skipped = [], []
    # The short sections first: when the budget runs out, it is the training presets that go.
    jobs = [("scans", lambda: scan_rows(s, clock, not args.no_compile))]
    jobs += [(f"decode {name}", lambda name=name, path=path, o=o: decode_rows(s, clock, name, path, o))
             for name, path, o in s.decode_presets]
    jobs += [(f"train {name}", lambda name=name, path=path, o=o: [training_row(s, clock, name, path, o, not args.no_compile, peaks)])
             for name, path, o in s.train_presets]
    for label, job in jobs:
        if time.perf_counter() - started > args.budget_s:
            skipped.append(label)
            continue
        job_start = time.perf_counter()
        new = job()
        rows += new
        print(f"{label}: {time.perf_counter() - job_start:.0f} s; " + "; ".join(
            json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k != "section"})
            for row in new), flush=True)
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "torch": torch.__version__, "peaks": peaks, "rows": rows, "skipped": skipped,
              "seconds": time.perf_counter() - started}
    (args.out / "gpu.json").write_text(json.dumps(result, indent=1))
    (args.out / "gpu.md").write_text(markdown(device, peaks, rows, skipped))
    print(markdown(device, peaks, rows, skipped))


if __name__ == "__main__":
    main()

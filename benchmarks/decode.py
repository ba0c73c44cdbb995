"""Decode throughput after long prompts: strata's families vs each other and vs HF ``generate``.

    python benchmarks/decode.py [--contexts 512 2048 8192 16384] [--batches 1 4] [--new 64]
                                [--repeats 3] [--compile] [--json results.jsonl]

For each prompt length and batch size, every contender generates ``--new`` greedy tokens after a
random prompt, through its public generate API (``strata.generate``; HF's ``model.generate`` with
the default dynamic cache). Decode speed is read from per-token callbacks (strata's ``on_token``,
an HF streamer): batch × (new − 1) tokens over the time from the first new token to the last, so
prefill is excluded. All contenders of one (context, batch) cell run in alternation, round after
round; rates are medians over rounds, and ratios are medians of per-round ratios (shown with
their range), which the machine's drift disturbs far less. HF peers share shapes and weights with a strata model:
``transformer`` ↔ ``LlamaForCausalLM``, ``mamba2 (no FFN)`` ↔ ``Mamba2ForCausalLM`` (whose blocks
have no FFN). With ``--compile`` strata's contenders decode with ``compile=True`` and HF Llama with
its compiled path (a static cache, and ``CompileConfig`` told to compile on a CPU too); HF Mamba2
stays eager, as its generate does not compile with its own cache. Every cell then has a warm-up
round, which compiles. HF sizes a static cache for the longest of all earlier calls (to spare a
recompile), so after a 16K cell it would decode a 512 prompt over a 16K cache, 25x slower; each
call here starts that record afresh, so every cell decodes over a cache of its own length.
CPU runs use float32 and the default thread count.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from results import append_json_lines
from timing import alternate, paired_ratio

from strata import build_model, load_config
from strata.cost.model import model_cost
from strata.inference.generate import generate

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny"
FAMILIES = ("transformer", "mamba2", "inter", "intra", "gdn", "inter-gdn", "kda")
NO_FFN = "mamba2 (no FFN)"
PEERS = (("transformer", "HF Llama"), (NO_FFN, "HF Mamba2"))


def rate(values: list[float]) -> float:
    return statistics.median(values)


def strata_decode(model, prompts: torch.Tensor, new: int, compile: bool = False):  # noqa: A002
    """A measure: seconds per decoding step of ``strata.generate`` over the batch."""

    def measure() -> float:
        stamps = []
        generate(model, list(prompts), new, compile=compile,
                 on_token=lambda index, token: index == 0 and stamps.append(time.perf_counter()))
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    return measure


class _Stamps:
    """An HF streamer that only records when each batch of new tokens arrives (the first call
    is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_decode(model, prompts: torch.Tensor, new: int, compile: bool = False):  # noqa: A002
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    if compile and model.config.model_type == "llama":
        from transformers import CompileConfig

        settings = CompileConfig(mode="default")  # its default, CUDA graphs, has no CPU meaning
        settings._compile_all_devices = True  # HF's own switch for compiling off GPUs
        model.generation_config.cache_implementation = "static"
        model.generation_config.compile_config = settings
    mask = torch.ones_like(prompts)

    def measure() -> float:
        stamps = _Stamps()
        model._previous_max_cache_length = -1  # HF sizes a static cache for the longest earlier call
        with torch.inference_mode():
            model.generate(prompts, attention_mask=mask, max_new_tokens=new, do_sample=False, streamer=stamps)
        times = stamps.times[1:]
        return (times[-1] - times[0]) / (len(times) - 1)

    return measure


def contenders(with_hf: bool) -> dict[str, torch.nn.Module]:
    models = {name: build_model(load_config(TINY / f"{name}.yaml")).eval() for name in FAMILIES}
    if with_hf:
        from strata.interop.pretrained import to_hf_model

        models[NO_FFN] = build_model(load_config(TINY / "mamba2.yaml", ["model.ffn.kind=none"])).eval()
        models["HF Llama"] = to_hf_model(models["transformer"]).eval()
        models["HF Mamba2"] = to_hf_model(models[NO_FFN]).eval()
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new", type=int, default=64, help="tokens generated per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-hf", action="store_true", help="strata families only")
    parser.add_argument("--compile", action="store_true", help="strata decodes with compile=True, HF Llama with its static-cache compile")
    parser.add_argument("--json", type=Path, help="append one JSON object per result to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    import transformers

    transformers.logging.set_verbosity_error()
    models = contenders(not args.no_hf)
    print(
        f"{platform.processor() or platform.machine()} float32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {args.new} new tokens, median of {args.repeats}"
        + ("; compiled: strata (compile=True) and HF Llama (static cache), HF Mamba2 eager" if args.compile else "")
    )

    samples: dict[tuple[str, int, int], list[float]] = {}  # tokens/s per round
    for batch in args.batches:
        for context in args.contexts:
            prompts = torch.randint(0, 256, (batch, context))
            measures = {
                name: hf_decode(model, prompts, args.new, args.compile) if name.startswith("HF")
                else strata_decode(model, prompts, args.new, args.compile)
                for name, model in models.items()
            }
            seconds = alternate(measures, args.repeats, warmup=1 if context <= 2048 or args.compile else 0)
            for name, values in seconds.items():
                samples[name, batch, context] = [batch / s for s in values]
            print(f"  batch {batch}, context {context}: " + ", ".join(f"{n} {rate(samples[n, batch, context]):.0f}" for n in models), flush=True)

    def ratio_cell(a, b, batch, context) -> str:
        middle, low, high = paired_ratio(samples[a, batch, context], samples[b, batch, context])
        return f"{middle:6.2f}x ({low:.2f}-{high:.2f})"

    results = []
    header = "".join(f"{context:>9d}" for context in args.contexts)
    wide_header = "".join(f"{context:>20d}" for context in args.contexts)
    for batch in args.batches:
        print(f"\ndecode tokens/s, batch {batch} (context →){header}   cache MiB at {args.contexts[-1]}")
        for name, model in models.items():
            row = "".join(f"{rate(samples[name, batch, c]):9.0f}" for c in args.contexts)
            cache = "" if name.startswith("HF") else f"{batch * model_cost(model.config, args.contexts[-1], 'fp32').cache_mib:10.1f}"
            print(f"  {name:27s}{row} {cache}")
        print(f"ratio to the transformer, per round{wide_header[6:]}")
        for name in FAMILIES:
            print(f"  {name:27s}" + "".join(f"{ratio_cell(name, 'transformer', batch, c):>20s}" for c in args.contexts))
        if not args.no_hf:
            print(f"strata / HF generate, per round{wide_header[2:]}")
            for ours, theirs in PEERS:
                label = f"{ours} / {theirs}"
                print(f"  {label:27s}" + "".join(f"{ratio_cell(ours, theirs, batch, c):>20s}" for c in args.contexts))
        for name in models:
            for context in args.contexts:
                results.append({"model": name, "batch": batch, "context": context, "tokens_per_s": samples[name, batch, context]})

    first, last = args.contexts[0], args.contexts[-1]
    print("\ntargets")
    for batch in args.batches:
        for name in ("mamba2", "gdn", "kda"):
            flat = rate(samples[name, batch, last]) / rate(samples[name, batch, first])
            print(f"  batch {batch}: {name} at {last} / at {first}: {flat:.2f} (target >= 0.9)")
        for name in ("inter", "intra"):
            print(f"  batch {batch}: {name} / transformer at {last}: {ratio_cell(name, 'transformer', batch, last)} (target >= 3)")
        if not args.no_hf:
            for ours, theirs in PEERS:
                print(f"  batch {batch}: {ours} / {theirs} at {first}: {ratio_cell(ours, theirs, batch, first)} (target >= 2)")

    append_json_lines(args.json, results)


if __name__ == "__main__":
    main()

"""Imported Hugging Face models: strata and transformers on identical weights, training and decoding.

    python benchmarks/hf_models.py [--families bamba falconh1 llama mamba2 granite nemotronh]
                                   [--what train decode] [--d-model 256] [--layers 6] [--batch 4] [--seq 512]
                                   [--decode-families bamba falconh1] [--contexts 512 8192] [--new 32]
                                   [--repeats 5] [--compile] [--profile]
                                   [--json results.jsonl]

For each family a transformers model is built from the family's config class (the shapes below,
scaled with ``--d-model`` and ``--layers``) with random weights (transformers' initialisation; the
Mamba-2 step sizes and decays redrawn as Mamba-2 initialises them, ``mamba_init``), saved with
``save_pretrained`` to a temporary directory, and loaded from that directory twice: by
``strata.from_pretrained`` and by transformers' ``from_pretrained``. Both sides therefore run the
same weights, and the checkpoint goes through strata's import path as a downloaded one would.

Training step: forward + cross-entropy + backward + AdamW on ``--batch`` × ``--seq`` tokens
(``train_step.training_step``), float32, both sides eager (neither is compiled). HF's Mamba-2
mixers run their pure-PyTorch path (``torch_forward``: the CUDA kernels do not exist on a CPU).
The two sides alternate round after round (``timing.alternate``); the speed-up is the median of
the per-round ratios HF time / strata time, with their range, which drift in the machine's speed
disturbs far less than a ratio of medians. "best / best" is the ratio of each side's fastest
round: read it when other processes took the CPU in bursts (a 2-core machine shared with them
slowed the small-op Mamba paths up to 20× in some rounds, Llama's few large GEMMs hardly).
``--profile`` adds torch.profiler's top operators (by self CPU time) of one strata step and one
HF step per family.

Decode: batch 1, a random prompt of ``context − new`` tokens, ``--new`` greedy tokens. strata runs
``strata.generate`` (temperature 0); HF runs ``model.generate(do_sample=False)`` with an explicit
attention mask of ones (without it, generate takes prompt tokens equal to pad_token_id for
padding) and, eager, its default cache (dynamic; the hybrid families' Mamba state sits in it
beside the K/V). Per-token callbacks (strata's ``on_token``, an HF streamer, as in ``decode.py``)
split each call into prefill (call start to first new token: prompt tokens/s) and decoding
(first to last new token: (new − 1) tokens over that time, tokens/s). The speed-up is strata's
rate over HF's, median of per-round ratios with their range. With ``--compile`` strata decodes
with ``generate(compile=True)`` and HF with its compiled path: a static cache and a
``CompileConfig`` told to compile on a CPU too (as ``decode.py`` gives HF Llama); a family whose
compiled generate fails is recorded as "HF has no compiled path for FAMILY on CPU: <error>" and
compared against HF eager instead. Prefill is eager on both sides either way.

Read the ratios, not the milliseconds: these are shared 2-core machines whose speed drifts.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from decode import _Stamps
from results import append_json_lines
from rich.console import Console
from rich.table import Table
from timing import alternate, paired_ratio, timed
from train_step import hf_logits, strata_logits, training_step

from strata import from_pretrained
from strata.inference.generate import generate

# --- shapes ----------------------------------------------------------------------------------------
# The measurement point is d_model 256, 6 layers; every width below scales with d_model,
# so that the smoke test's d_model 32 keeps the same proportions. The tiny presets
# (configs/tiny/transformer.yaml, mamba2.yaml: d_model 128, heads of 32, d_state 32, d_ffn 3 × d_model,
# Mamba expand 2) scaled to d_model 256 give heads of 64 and d_state 64.
VOCAB = 259  # the tiny presets' byte vocabulary: a 128K vocabulary's head would dominate a d_model-256 step
HEADS, KV_HEADS = 4, 2  # attention: 4 query heads of d_model / 4 (64 at 256) over 2 K/V heads
FFN_RATIO = 3  # SwiGLU intermediate size = 3 × d_model (768 at 256), as configs/tiny/*.yaml
MAMBA_EXPAND = 2  # Mamba-2 inner width d_ssm = 2 × d_model, heads of d_model / 4 (8 heads of 64 at 256)
STATE_RATIO = 4  # d_state = d_model / 4 (64 at 256; the tiny presets' 32 at 128)
CHUNK = 32  # SSD chunk size of strata's CPU presets (64 and 128 are slower on a CPU for both sides:
# BENCHMARKS.md, "What made the difference"); HF's mamba_chunk_size is set the same.
# Falcon-H1 (every layer attention ∥ Mamba-2, then SwiGLU): configs/paper/intra-falconh1-1b.yaml has at
# d_model 2048 an attention branch 1152 wide (16 × 72) and a Mamba branch 2304 wide, about 1 : 2;
# here 4 heads of d_model / 8 (attention width d_model / 2) beside a Mamba branch d_model wide
# (4 heads of d_model / 4), FFN as Bamba's.
FALCON_HEAD_RATIO, FALCON_SSM_RATIO = 8, 1
MAX_POSITIONS = 32768  # above every context measured


def attention_layers(layers: int) -> list[int]:
    """Bamba/Granite/Nemotron-H attention layers: every third (2 and 5 of 6), the last if none."""
    return [i for i in range(layers) if i % 3 == 2] or [layers - 1]


def hf_config(family: str, d_model: int, layers: int):
    """The transformers config of ``family`` at this width and depth (shapes above)."""
    import transformers

    head = d_model // 4
    common = {"vocab_size": VOCAB, "hidden_size": d_model, "tie_word_embeddings": False, "pad_token_id": 0,
              "bos_token_id": 1, "eos_token_id": 2}
    attention = {"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "max_position_embeddings": MAX_POSITIONS}
    mamba = {"mamba_n_heads": MAMBA_EXPAND * d_model // head, "mamba_d_head": head, "mamba_d_state": d_model // STATE_RATIO,
             "mamba_n_groups": 1, "mamba_chunk_size": CHUNK, "mamba_expand": MAMBA_EXPAND}
    ffn = FFN_RATIO * d_model
    hybrid = attention_layers(layers)
    if family == "llama":
        return transformers.LlamaConfig(**common, **attention, num_hidden_layers=layers, intermediate_size=ffn)
    if family == "mamba2":  # HF's Mamba2 blocks have no FFN
        return transformers.Mamba2Config(**common, num_hidden_layers=layers, num_heads=MAMBA_EXPAND * d_model // head,
                                         head_dim=head, expand=MAMBA_EXPAND, state_size=d_model // STATE_RATIO,
                                         n_groups=1, chunk_size=CHUNK)
    if family == "bamba":
        return transformers.BambaConfig(**common, **attention, **mamba, num_hidden_layers=layers, intermediate_size=ffn,
                                        attn_layer_indices=hybrid)
    if family == "falconh1":
        n_heads = FALCON_SSM_RATIO * d_model // head
        return transformers.FalconH1Config(**common, **attention, **(mamba | {"mamba_n_heads": n_heads}),
                                           num_hidden_layers=layers, intermediate_size=ffn,
                                           head_dim=d_model // FALCON_HEAD_RATIO, mamba_d_ssm=n_heads * head)
    if family == "granite":  # Granite-4.0-H dense: no routed experts, the shared MLP as the FFN
        return transformers.GraniteMoeHybridConfig(
            **common, **attention, **mamba, num_hidden_layers=layers, num_local_experts=0, shared_intermediate_size=ffn,
            position_embedding_type="rope", layer_types=["attention" if i in hybrid else "mamba" for i in range(layers)])
    if family == "nemotronh":  # one sublayer a layer: Bamba's layers, each a mixer then a relu² MLP
        pattern = "".join(("*" if i in hybrid else "M") + "-" for i in range(layers))
        return transformers.NemotronHConfig(
            **common, max_position_embeddings=MAX_POSITIONS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
            head_dim=head, hybrid_override_pattern=pattern, intermediate_size=ffn,
            mamba_num_heads=MAMBA_EXPAND * d_model // head, mamba_head_dim=head, n_groups=1,
            ssm_state_size=d_model // STATE_RATIO, chunk_size=CHUNK)
    raise ValueError(f"unknown family {family!r}")


FAMILIES = ("bamba", "falconh1", "llama", "mamba2", "granite", "nemotronh")
LABELS = {"bamba": "Bamba", "falconh1": "Falcon-H1", "llama": "Llama", "mamba2": "Mamba2",
          "granite": "GraniteMoeHybrid (dense)", "nemotronh": "Nemotron-H"}
# Training speed-up strata / HF: the targets, and what the issue measured before this work.
TRAIN_TARGETS = {"bamba": 1.5, "falconh1": 1.5}
TRAIN_BEFORE = {"bamba": 1.31, "falconh1": 1.23, "llama": 1.02, "mamba2": 1.50}
DECODE_TARGETS = {"bamba": 2.0, "falconh1": 2.0}


def mamba_init(hf_model, dt_range=(1e-3, 0.1), a_range=(1.0, 16.0)) -> None:
    """Redraw every Mamba-2 mixer's A_log and dt_bias as Mamba-2 initialises them (mamba_ssm, and
    strata's ``a_init_range``/``dt_min``/``dt_max``): A = −U[1, 16], step size dt log-uniform in
    [0.001, 0.1] (dt_bias its inverse softplus).

    transformers' constructors set dt_bias to 1 (Bamba, Falcon-H1, Granite) or 3–7 (Mamba2,
    Nemotron-H) with A = −1 … −(heads): step sizes of 1.3–7 and decays down to exp(−10) to exp(−56)
    a token, far from a trained model's. Their products underflow into denormal floats (a 60-token
    Bamba prompt at d_model 32: ~1,400 denormal results of exp and mul, on each side; none with
    this initialisation), which a CPU computes on many times slower, so such weights would time
    the FPU's denormal penalty rather than the code.
    """
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in hf_model.modules():
            if isinstance(getattr(module, "A_log", None), torch.Tensor) and isinstance(getattr(module, "dt_bias", None), torch.Tensor):
                heads = module.A_log.shape
                low, high = math.log(dt_range[0]), math.log(dt_range[1])
                dt = torch.exp(torch.rand(heads, generator=generator) * (high - low) + low).clamp(min=1e-4)
                module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
                module.A_log.copy_(torch.empty(heads).uniform_(*a_range, generator=generator).log())


class Checkpoint:
    """A random HF model of ``family`` saved to a temporary directory; ``load()`` gives a fresh
    (strata model, HF model) pair with the saved weights."""

    def __init__(self, family: str, d_model: int, layers: int, root: Path):
        from transformers import AutoModelForCausalLM

        self.family, self.directory = family, root / family
        torch.manual_seed(0)
        hf_model = AutoModelForCausalLM.from_config(hf_config(family, d_model, layers))
        mamba_init(hf_model)
        hf_model.save_pretrained(str(self.directory))
        self.architecture = type(hf_model).__name__
        self.checked = False

    def load(self):
        from transformers import AutoModelForCausalLM

        ours = from_pretrained(self.directory).model
        theirs = AutoModelForCausalLM.from_pretrained(str(self.directory))
        theirs.generation_config.eos_token_id = None  # random weights: never stop early
        theirs.generation_config.pad_token_id = 0
        if not self.checked:  # the comparison means something only if both compute the same function
            tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                torch.testing.assert_close(ours.eval()(tokens), theirs.eval()(tokens).logits, atol=1e-4, rtol=1e-4,
                                           msg=lambda m: f"{self.architecture}: strata's import differs from HF: {m}")
            self.checked = True
        return ours, theirs


def machine_line() -> str:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, float32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def ratio_text(ratio: tuple[float, float, float]) -> str:
    middle, low, high = ratio
    return f"{middle:.2f}× ({low:.2f}–{high:.2f})"


# --- training --------------------------------------------------------------------------------------


def train_steps(checkpoint: Checkpoint, batch: int, seq: int) -> dict[str, Callable[[], object]]:
    ours, theirs = checkpoint.load()
    ours.train()
    theirs.train()
    tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    return {"strata": training_step(ours, tokens, strata_logits), "hf": training_step(theirs, tokens, hf_logits)}


def measure_training(checkpoint: Checkpoint, args) -> dict:
    steps = train_steps(checkpoint, args.batch, args.seq)
    seconds = alternate({name: timed(step) for name, step in steps.items()}, args.repeats, warmup=2)
    family = checkpoint.family
    return {
        "what": "train", "family": family, "architecture": checkpoint.architecture,
        "d_model": args.d_model, "layers": args.layers, "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
        "strata_s": statistics.median(seconds["strata"]), "hf_s": statistics.median(seconds["hf"]),
        "speedup": paired_ratio(seconds["hf"], seconds["strata"])[0],
        "speedup_range": list(paired_ratio(seconds["hf"], seconds["strata"])[1:]),
        "best_speedup": min(seconds["hf"]) / min(seconds["strata"]),
        "strata_rounds_s": seconds["strata"], "hf_rounds_s": seconds["hf"],
    }


def profile_training(checkpoint: Checkpoint, args, console: Console, top: int = 15) -> None:
    """torch.profiler's top operators by self CPU time, one step of each side (after two warm-ups)."""
    from torch.profiler import ProfilerActivity, profile

    for name, step in train_steps(checkpoint, args.batch, args.seq).items():
        step(), step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        console.print(f"\n[bold]{LABELS[checkpoint.family]}, {name} training step[/bold], top {top} ops by self CPU time")
        console.print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48))


def training_table(rows: list[dict]) -> Table:
    table = Table(title="Training step: strata eager vs HF eager, identical imported weights")
    for column in ("case", "strata ms", "HF ms", "speed-up (rounds)", "best / best", "target", "issue, before"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for row in rows:
        family = row["family"]
        target = TRAIN_TARGETS.get(family)
        met = "" if target is None else (" met" if row["speedup"] >= target else " not met")
        before = TRAIN_BEFORE.get(family)
        table.add_row(f"{LABELS[family]} ({row['architecture']})", f"{row['strata_s'] * 1e3:.1f}", f"{row['hf_s'] * 1e3:.1f}",
                      ratio_text((row["speedup"], *row["speedup_range"])), f"{row['best_speedup']:.2f}×",
                      "" if target is None else f"≥ {target:.1f}×{met}", "" if before is None else f"{before:.2f}×")
    return table


# --- decoding --------------------------------------------------------------------------------------


class Generations:
    """One contender's measure for ``timing.alternate``: each call generates once and returns its
    seconds per decoded token; the prefill seconds of every call are kept in ``prefill``."""

    def __init__(self, run: Callable[[], tuple[float, float]]):
        self.run, self.prefill = run, []

    def __call__(self) -> float:
        prefill, per_token = self.run()
        self.prefill.append(prefill)
        return per_token


def strata_generation(model, prompt: torch.Tensor, new: int, compile: bool):
    ids = prompt[0].tolist()

    def run() -> tuple[float, float]:
        stamps = []
        start = time.perf_counter()
        generate(model, [ids], new, temperature=0.0, compile=compile, on_token=lambda index, token: stamps.append(time.perf_counter()))
        return stamps[0] - start, (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    return run


def hf_generation(model, prompt: torch.Tensor, new: int):
    mask = torch.ones_like(prompt)

    def run() -> tuple[float, float]:
        stamps = _Stamps()  # its first stamp is the prompt, then one per new token
        model._previous_max_cache_length = -1  # a static cache sized for this call alone (decode.py)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           streamer=stamps)
        times = stamps.times[1:]
        return times[0] - start, (times[-1] - times[0]) / (len(times) - 1)

    return run


def hf_compiled_path(model, family: str, run: Callable[[], tuple[float, float]]) -> str:
    """Switch ``model`` to HF's compiled generate (static cache, compiled on a CPU too) and try it
    once (which compiles); on failure switch back to eager. Returns what HF runs."""
    from transformers import CompileConfig

    settings = CompileConfig(mode="default")  # its default, CUDA graphs, has no CPU meaning
    settings._compile_all_devices = True  # HF's own switch for compiling off GPUs
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = settings
    try:
        run()
        if not hasattr(model, "_compiled_call"):
            raise RuntimeError("generate ran without compiling (its cache is not compileable)")
        return "compiled, static cache"
    except Exception as error:  # noqa: BLE001 - any failure is a result to report
        model.generation_config.cache_implementation = None
        model.generation_config.compile_config = None
        first = (str(error).strip().splitlines() or [""])[0][:200]
        return f"eager, dynamic cache (HF has no compiled path for {LABELS[family]} on CPU: {type(error).__name__}: {first})"


def measure_decoding(checkpoint: Checkpoint, context: int, args, console: Console) -> dict:
    ours, theirs = checkpoint.load()
    prompt_length = context - args.new
    prompt = torch.randint(3, VOCAB, (1, prompt_length), generator=torch.Generator().manual_seed(context))
    hf_run = hf_generation(theirs, prompt, args.new)
    hf_path = hf_compiled_path(theirs, checkpoint.family, hf_run) if args.compile else "eager, dynamic cache"
    if "no compiled path" in hf_path:
        console.print(f"  [yellow]{hf_path}[/yellow]")
    measures = {"strata": Generations(strata_generation(ours, prompt, args.new, args.compile)), "hf": Generations(hf_run)}
    warmup = 1 if context <= 2048 or args.compile else 0
    seconds = alternate(measures, args.repeats, warmup)
    rates = {name: [1 / s for s in values] for name, values in seconds.items()}
    prefill = {name: [prompt_length / s for s in measure.prefill[-args.repeats:]] for name, measure in measures.items()}
    speedup, low, high = paired_ratio(rates["strata"], rates["hf"])
    prefill_speedup, prefill_low, prefill_high = paired_ratio(prefill["strata"], prefill["hf"])
    return {
        "what": "decode", "family": checkpoint.family, "architecture": checkpoint.architecture,
        "d_model": args.d_model, "layers": args.layers, "batch": 1, "context": context, "prompt": prompt_length,
        "new": args.new, "repeats": args.repeats, "compile": args.compile,
        "strata_path": "compiled (generate(compile=True))" if args.compile else "eager", "hf_path": hf_path,
        "strata_tokens_per_s": statistics.median(rates["strata"]), "hf_tokens_per_s": statistics.median(rates["hf"]),
        "speedup": speedup, "speedup_range": [low, high],
        "strata_prefill_tokens_per_s": statistics.median(prefill["strata"]),
        "hf_prefill_tokens_per_s": statistics.median(prefill["hf"]),
        "prefill_speedup": prefill_speedup, "prefill_speedup_range": [prefill_low, prefill_high],
        "best_speedup": max(rates["strata"]) / max(rates["hf"]),
        "strata_rounds_tokens_per_s": rates["strata"], "hf_rounds_tokens_per_s": rates["hf"],
    }


def decoding_table(rows: list[dict], compiled: bool) -> Table:
    table = Table(title="Decode, batch 1: strata " + ("generate(compile=True) vs HF compiled" if compiled else "eager vs HF eager")
                  + " generate, identical imported weights")
    columns = ("case", "context", "strata tok/s", "HF tok/s", "decode speed-up", "best / best", "target", "strata prefill tok/s",
               "HF prefill tok/s", "prefill speed-up", "HF ran")
    for column in columns:
        table.add_column(column, justify="left" if column in ("case", "HF ran") else "right")
    for row in rows:
        target = DECODE_TARGETS.get(row["family"])
        met = "" if target is None else (" met" if row["speedup"] >= target else " not met")
        table.add_row(LABELS[row["family"]], str(row["context"]), f"{row['strata_tokens_per_s']:.0f}", f"{row['hf_tokens_per_s']:.0f}",
                      ratio_text((row["speedup"], *row["speedup_range"])), f"{row['best_speedup']:.2f}×",
                      "" if target is None else f"≥ {target:.0f}×{met}",
                      f"{row['strata_prefill_tokens_per_s']:.0f}", f"{row['hf_prefill_tokens_per_s']:.0f}",
                      ratio_text((row["prefill_speedup"], *row["prefill_speedup_range"])), row["hf_path"])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=["bamba", "falconh1", "llama", "mamba2"])
    parser.add_argument("--what", nargs="+", choices=("train", "decode"), default=["train", "decode"])
    parser.add_argument("--decode-families", nargs="+", choices=FAMILIES,
                        help="families to decode (default: --families' Bamba and Falcon-H1, or all of --families if neither)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 8192])
    parser.add_argument("--new", type=int, default=32, help="tokens generated per decode measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="decode with strata compile=True and HF's compiled static-cache path")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one training step per side")
    parser.add_argument("--json", type=Path, help="append one JSON object per result to this file")
    args = parser.parse_args()
    if args.new < 2 or min(args.contexts) <= args.new:
        parser.error("--new must be at least 2 and below every context")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    console = Console(width=200)
    console.print(f"{machine_line()}; d_model {args.d_model}, {args.layers} layers, vocabulary {VOCAB}, median of {args.repeats}")
    decode_families = args.decode_families or [f for f in args.families if f in DECODE_TARGETS] or args.families

    with tempfile.TemporaryDirectory() as root:
        checkpoints = {}

        def checkpoint(family: str) -> Checkpoint:
            if family not in checkpoints:
                checkpoints[family] = Checkpoint(family, args.d_model, args.layers, Path(root))
            return checkpoints[family]

        if "train" in args.what:
            rows = []
            for family in args.families:
                rows.append(measure_training(checkpoint(family), args))
                console.print(f"  train {family}: strata {rows[-1]['strata_s'] * 1e3:.1f} ms, HF {rows[-1]['hf_s'] * 1e3:.1f} ms")
                append_json_lines(args.json, rows[-1:])
            console.print(f"batch {args.batch} × {args.seq} tokens; forward + cross-entropy + backward + AdamW")
            console.print(training_table(rows))
            if args.profile:
                for family in args.families:
                    profile_training(checkpoint(family), args, console)

        if "decode" in args.what:
            rows = []
            for family in decode_families:
                for context in args.contexts:
                    rows.append(measure_decoding(checkpoint(family), context, args, console))
                    row = rows[-1]
                    console.print(f"  decode {family} at {context}: strata {row['strata_tokens_per_s']:.0f}, "
                                  f"HF {row['hf_tokens_per_s']:.0f} tokens/s")
                    append_json_lines(args.json, rows[-1:])
            console.print(f"{args.new} new tokens after a prompt of context − {args.new}")
            console.print(decoding_table(rows, args.compile))


if __name__ == "__main__":
    main()

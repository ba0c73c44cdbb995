"""Training-step throughput: strata vs HF transformers on identical shapes and weights, in one run.

    python benchmarks/train_step.py [--batch 8] [--seq 256] [--repeats 7] [--json results.jsonl]
    python benchmarks/train_step.py --document-masking [--batch 4 --seq 512 --documents 4]

``--document-masking`` instead times each layout-stack family with and without ``segment_ids``
(``--documents`` equal documents a row), in alternation: the cost of keeping packed documents apart.

A step is forward + cross-entropy + backward + AdamW. Each pair (strata, HF) is timed in
alternation, repeat after repeat, and the median of each is compared, so machine noise hits both
sides alike; the figure to read is the ratio, not the absolute time. The SSD scan is timed alone
(forward + backward) against HF's pure-PyTorch ``mamba2_chunk_scan``, the gated delta rule
against transformers' ``torch_chunk_gated_delta_rule`` and the rule with a decay per key channel
(Kimi Delta Attention's) against its ``chunk_kimi_delta_attention`` (their CPU paths: fla's
kernels are Triton).
The tiny ``gdn`` preset's step is timed against the tiny ``mamba2`` preset's, of equal parameters
(target: at least 0.8x its speed). CPU runs use float32.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from results import append_json_lines
from timing import alternate, paired_ratio, time_alternating, timed

from strata import build_model, load_config
from strata.cost.model import model_cost
from strata.nn.delta_rule import gated_delta_chunked
from strata.nn.ssd import ssd_chunked

ROOT = Path(__file__).resolve().parents[1]


def training_step(model, tokens, logits_of):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = logits_of(model, tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()

    return step


def strata_logits(model, tokens):
    return model(tokens)


def hf_logits(model, tokens):
    return model(tokens).logits


def peer_cases():
    """(name, strata model, HF model) with identical weights; import transformers lazily."""
    from strata.interop.pretrained import to_hf_model

    transformer = build_model(load_config(ROOT / "configs/tiny/transformer.yaml"))
    yield "transformer vs HF Llama", transformer, to_hf_model(transformer)
    mamba = build_model(load_config(ROOT / "configs/tiny/mamba2.yaml", ["model.ffn.kind=none"]))
    yield "mamba2 vs HF Mamba2", mamba, to_hf_model(mamba)


def scan_case(batch: int, seq: int, repeats: int) -> dict[str, float]:
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    heads, head_dim, state, chunk = 8, 32, 32, 32
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, heads, head_dim, generator=generator, requires_grad=True)
    dt = torch.randn(batch, seq, heads, generator=generator).requires_grad_()
    A = -torch.rand(heads, generator=generator).requires_grad_()
    B = torch.randn(batch, seq, 1, state, generator=generator, requires_grad=True)
    C = torch.randn(batch, seq, 1, state, generator=generator, requires_grad=True)
    D = torch.randn(heads, generator=generator).requires_grad_()

    def strata_scan():
        y, _ = ssd_chunked(x, F.softplus(dt), A, B, C, chunk, D)
        y.sum().backward()

    def hf_scan():
        y = mamba2_chunk_scan(x, dt, A, B, C, chunk, D=D, dt_softplus=True)
        y.sum().backward()

    return time_alternating({"strata": strata_scan, "hf": hf_scan}, repeats)


def delta_rule_case(batch: int, seq: int, repeats: int, channelwise: bool = False) -> dict[str, float]:
    """The tiny ``gdn`` preset's rule (4 heads, key 32, value 48, chunks of 32), forward + backward,
    against transformers' Qwen3-Next rule; ``channelwise``: with a decay per key channel (Kimi
    Delta Attention's), against transformers' Kimi Linear rule."""
    from transformers.models.kimi_linear.modeling_kimi_linear import chunk_kimi_delta_attention
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    heads, key_width, value_width, chunk = 4, 32, 48, 32
    generator = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(batch, seq, heads, key_width, generator=generator), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(batch, seq, heads, key_width, generator=generator), dim=-1).requires_grad_()
    v = torch.randn(batch, seq, heads, value_width, generator=generator, requires_grad=True)
    decays = (batch, seq, heads, key_width) if channelwise else (batch, seq, heads)
    g = (-torch.rand(*decays, generator=generator)).requires_grad_()
    beta = torch.rand(batch, seq, heads, generator=generator, requires_grad=True)
    theirs = chunk_kimi_delta_attention if channelwise else torch_chunk_gated_delta_rule

    def strata_rule():
        o, _ = gated_delta_chunked(q * key_width**-0.5, k, v, g, beta, chunk)
        o.sum().backward()

    def hf_rule():
        o, _ = theirs(q, k, v, g, beta, chunk_size=chunk)  # scales q itself
        o.sum().backward()

    return time_alternating({"strata": strata_rule, "hf": hf_rule}, repeats)


def matmul_peak(sizes=(1024, 2048, 3072), repeats: int = 5) -> float:
    """Best measured fp32 FLOP/s of large square matmuls: the denominator of CPU MFU."""
    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


# Tiny layout-stack presets (AU-Net has its own benchmark, aunet.py), plus a d_model-256
# transformer (the width at which the MFU target applies).
FAMILIES = {
    path.stem: (path, [])
    for path in sorted((ROOT / "configs/tiny").glob("*.yaml"))
    if load_config(path).model.kind == "lm"
}
FAMILIES["transformer-256"] = (ROOT / "configs/tiny/transformer.yaml", ["model.d_model=256", "model.ffn.d_ffn=768"])


def family_throughput(batch: int, seq: int, repeats: int) -> dict[str, tuple[float, float]]:
    """(tokens/s, model FLOPs per token) of a training step for every family, timed in alternation.

    Model FLOPs per token are the cost model's 6·N plus attention/SSM terms plus the output head.
    """
    steps, flops = {}, {}
    for name, (path, overrides) in FAMILIES.items():
        config = load_config(path, overrides)
        model = build_model(config)
        tokens = torch.randint(0, model.config.vocab_size, (batch, seq + 1))
        steps[name] = training_step(model, tokens, strata_logits)
        flops[name] = model_cost(config.model, seq, "fp32").flops_per_token_with_head
    seconds = time_alternating(steps, repeats)
    return {name: (batch * seq / s, flops[name]) for name, s in seconds.items()}


def masking_overhead(batch: int, seq: int, documents: int, repeats: int) -> list[dict]:
    """Per family: a training step with ``segment_ids`` (``documents`` documents a row) against the
    same step without, timed in alternation; the overhead is their median per-round ratio − 1."""
    ids = torch.arange(seq).div(-(-seq // documents), rounding_mode="floor").expand(batch, -1)
    rows = []
    for name, (path, overrides) in FAMILIES.items():
        model = build_model(load_config(path, overrides))
        tokens = torch.randint(0, model.config.vocab_size, (batch, seq + 1))
        samples = alternate({
            "plain": timed(training_step(model, tokens, strata_logits)),
            "masked": timed(training_step(model, tokens, lambda m, t: m(t, segment_ids=ids))),
        }, repeats)
        ratio, low, high = paired_ratio(samples["masked"], samples["plain"])
        rows.append({"case": f"document masking {name}", "plain_s": statistics.median(samples["plain"]),
                     "masked_s": statistics.median(samples["masked"]), "overhead": ratio - 1,
                     "overhead_low": low - 1, "overhead_high": high - 1})
    return rows


def report_masking(args) -> None:
    rows = masking_overhead(args.batch, args.seq, args.documents, args.repeats)
    print(f"{platform.processor() or platform.machine()} float32, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; batch {args.batch} x {args.seq} tokens, {args.documents} documents a row, "
          f"{args.repeats} alternating rounds; target: overhead <= 15 %")
    print(f"{'family':34s} {'plain ms':>9s} {'masked ms':>10s} {'overhead':>9s} {'range':>16s}")
    for row in rows:
        print(f"{row['case']:34s} {row['plain_s'] * 1e3:9.1f} {row['masked_s'] * 1e3:10.1f} {row['overhead']:8.1%} "
              f"{row['overhead_low']:7.1%}..{row['overhead_high']:.1%}")
    append_json_lines(args.json, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, help="append one JSON object per result to this file")
    parser.add_argument("--document-masking", action="store_true",
                        help="time each family with segment_ids against without instead")
    parser.add_argument("--documents", type=int, default=4, help="documents a row for --document-masking")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.document_masking:
        report_masking(args)
        return
    results = []

    for name, ours, theirs in peer_cases():
        tokens = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq + 1))
        seconds = time_alternating(
            {"strata": training_step(ours, tokens, strata_logits), "hf": training_step(theirs, tokens, hf_logits)},
            args.repeats,
        )
        results.append({"case": name, "strata_s": seconds["strata"], "hf_s": seconds["hf"], "speedup": seconds["hf"] / seconds["strata"]})

    seconds = scan_case(args.batch, args.seq, args.repeats)
    results.append(
        {"case": "SSD scan fwd+bwd vs HF", "strata_s": seconds["strata"], "hf_s": seconds["hf"], "speedup": seconds["hf"] / seconds["strata"]}
    )

    for case, channelwise in (("gated delta rule fwd+bwd vs HF", False), ("Kimi delta rule fwd+bwd vs HF", True)):
        seconds = delta_rule_case(args.batch, args.seq, args.repeats, channelwise)
        results.append({"case": case, "strata_s": seconds["strata"], "hf_s": seconds["hf"],
                        "speedup": seconds["hf"] / seconds["strata"]})

    gdn, mamba = (build_model(load_config(ROOT / f"configs/tiny/{name}.yaml")) for name in ("gdn", "mamba2"))
    tokens = torch.randint(0, gdn.config.vocab_size, (args.batch, args.seq + 1))
    samples = alternate({"gdn": timed(training_step(gdn, tokens, strata_logits)),
                         "mamba2": timed(training_step(mamba, tokens, strata_logits))}, args.repeats, warmup=2)
    speed, low, high = paired_ratio(samples["mamba2"], samples["gdn"])
    results.append({"case": "tiny gdn vs tiny mamba2", "strata_s": statistics.median(samples["gdn"]),
                    "hf_s": statistics.median(samples["mamba2"]), "speedup": speed, "speedup_low": low, "speedup_high": high})

    import transformers

    print(
        f"{platform.processor() or platform.machine()} float32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; batch {args.batch} x {args.seq} tokens, median of {args.repeats}"
    )
    print(f"{'case':30s} {'strata ms':>10s} {'HF ms':>10s} {'speedup':>8s}")
    for row in results:
        print(f"{row['case']:30s} {row['strata_s'] * 1e3:10.1f} {row['hf_s'] * 1e3:10.1f} {row['speedup']:7.2f}x")
    print("(the last row's 'HF' column is the tiny mamba2 preset, its speedup the gdn step's speed relative to "
          f"it, per-round range {low:.2f}-{high:.2f}; target >= 0.8)")

    peak = matmul_peak()
    throughput = family_throughput(args.batch, args.seq, args.repeats)
    peak = max(peak, matmul_peak())  # measured on both sides of the families: the machine drifts
    reference = throughput["transformer"][0]
    print(f"\nfp32 matmul peak (best of 1024^3..3072^3): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'family':16s} {'tokens/s':>10s} {'vs transformer':>15s} {'GFLOP/s':>9s} {'CPU MFU':>8s}")
    for name, (rate, flops_per_token) in throughput.items():
        achieved = rate * flops_per_token
        print(f"{name:16s} {rate:10.0f} {rate / reference:14.2f}x {achieved / 1e9:9.1f} {achieved / peak:8.1%}")
        results.append(
            {"case": f"throughput {name}", "tokens_per_s": rate, "vs_transformer": rate / reference, "flops_per_s": achieved, "mfu": achieved / peak}
        )

    append_json_lines(args.json, results)


if __name__ == "__main__":
    main()

"""The cost model against the numbers of "Hybrid Architectures for Language Models" (Bae et al.,
2025): its cost formulas, Table 8, the 1B results and the appendix; and against built modules.

Weights are only ever allocated on the ``meta`` device.
"""

import itertools
from functools import cache
from pathlib import Path

import pytest

from strata import ConfigError, build_model, load_config
from strata.config import AUNetConfig
from strata.cost.model import (
    attention_params,
    attention_sequence_flops,
    causal_pairs,
    mamba_params,
    mamba_sequence_flops,
    mixer_params,
    model_cost,
)

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"
TINY = ROOT / "configs" / "tiny"
ALL_CONFIGS = sorted(PAPER.glob("*.yaml")) + sorted(TINY.glob("*.yaml"))
# AU-Net presets have their own cost model (tests/test_aunet_cost.py).
LM_CONFIGS = [path for path in ALL_CONFIGS if not isinstance(load_config(path).model, AUNetConfig)]
MIB = 2**20
CONTEXT = 8192


@cache
def paper(name: str, *overrides: str):
    return load_config(PAPER / f"{name}.yaml", list(overrides)).model


def cost(name: str, *overrides: str, context: int = CONTEXT, dtype: str = "bf16"):
    return model_cost(paper(name, *overrides), context, dtype)


def rel(actual: float, expected: float) -> float:
    return abs(actual - expected) / abs(expected)


def test_all_presets_found():
    grid = {f"{family}-{size}.yaml" for family in ("llama", "mamba2", "swa", "inter", "intra") for size in ("100m", "350m", "1b", "3b")}
    ablations = {"intra-hymba-1b.yaml", "intra-falconh1-1b.yaml"}
    aunets = {"aunet2-1b.yaml", "aunet3-1b.yaml", "aunet4-1b.yaml", "aunet2-7b.yaml"}
    assert {path.name for path in PAPER.glob("*.yaml")} == grid | ablations | aunets
    assert len(list(TINY.glob("*.yaml"))) == 19  # 17 models, the sweeps' hybrid family and the MQAR model
    # tiny aunet2, aunet3, aunet2-hybrid, hnet2, aunet2-entropy
    assert len(LM_CONFIGS) == len(ALL_CONFIGS) - len(aunets) - 5


def test_hymba_and_falcon_h1_like_presets_carry_the_papers_axes():
    hymba = load_config(PAPER / "intra-hymba-1b.yaml").model
    falcon = load_config(PAPER / "intra-falconh1-1b.yaml").model
    assert hymba.layout == falcon.layout == "H" * 13  # the ablations make every layer hybrid
    axes = lambda h: (h.norm, h.scale, h.fusion, h.out_proj)
    assert axes(hymba.hybrid) == ("group", "vector", "add", "joint")
    assert axes(falcon.hybrid) == ("none", "none", "concat", "joint")
    # 13 hybrid blocks at the 1:1 split: the appendix's 180 MiB at 8K, within 5 %
    assert model_cost(hymba, 8192, "bf16").cache_bytes / 2**20 == pytest.approx(180, rel=0.05)


# --- parameters (the hybrid paper's Table 8) -------------------------------------------------------------


@pytest.mark.parametrize(
    "name, billions",
    [
        ("llama-1b", 0.97),
        ("mamba2-1b", 0.98),
        ("inter-1b", 0.96),
        ("intra-1b", 0.98),
        ("swa-1b", 0.97),
    ],
)
def test_non_embedding_params_at_1b(name, billions):
    assert rel(cost(name).non_embedding_params, billions * 1e9) < 0.03


@pytest.mark.parametrize(
    "name, billions",
    [
        ("llama-100m", 0.10),
        ("llama-350m", 0.35),
        ("llama-3b", 2.78),
        ("mamba2-100m", 0.10),
        ("mamba2-350m", 0.37),
        ("mamba2-3b", 2.80),
    ],
)
def test_non_embedding_params_table_8(name, billions):
    assert rel(cost(name).non_embedding_params, billions * 1e9) < 0.05


def test_embedding_params_are_tied():
    c = cost("llama-1b")
    assert c.params == c.non_embedding_params + 128256 * 2048
    untied = cost("llama-1b", "model.tie_embeddings=false")
    assert untied.params == c.params + 128256 * 2048
    assert untied.non_embedding_params == c.non_embedding_params


def test_attention_mixer_params_formula_at_1b():
    """Brief §2: attention mixer params = 2·d_model² + 2·d_model·d_head·N_kv."""
    config = paper("llama-1b")
    d, d_head, n_kv = 2048, 64, 8
    assert attention_params(config.d_model, config.attention) == 2 * d * d + 2 * d * d_head * n_kv
    assert mixer_params("A", config) == 2 * d * d + 2 * d * d_head * n_kv


def test_mamba_mixer_is_about_2_5x_attention_mixer():
    """Brief §2: a Mamba block has ≈2.5× the parameters of an attention block (25M vs 10M at 1B)."""
    attention = mixer_params("A", paper("inter-1b"))
    mamba = mixer_params("M", paper("inter-1b"))
    assert mamba == mamba_params(2048, paper("mamba2-1b").mamba)
    assert round(attention / 1e6) == 10
    assert rel(mamba, 25e6) < 0.05
    assert rel(mamba / attention, 2.5) < 0.05


# --- cache (the hybrid paper's cost formulas, results and appendix) -----------------------------------------------------------


def test_llama_1b_cache_is_256_mib_exactly():
    c = cost("llama-1b")
    assert c.cache_bytes == 256 * MIB
    # the paper's cost formula: 4·N_layers·d_head·N_kv·L bytes in bf16
    assert c.cache_bytes == 4 * 16 * 64 * 8 * CONTEXT


def test_mamba2_1b_cache_13_4_mib():
    c = cost("mamba2-1b")
    assert abs(c.cache_mib - 13.4) <= 0.1
    # the paper's cost formula: 2·N_layers·(d_ssm·d_state + N_conv·(2·d_state + d_ssm)) bytes in bf16
    assert c.cache_bytes == 2 * 13 * (4096 * 128 + 4 * (2 * 128 + 4096))


@pytest.mark.parametrize("name, mib", [("inter-1b", 43), ("intra-1b", 38), ("swa-1b", 63)])
def test_hybrid_and_swa_cache_at_1b(name, mib):
    assert rel(cost(name).cache_mib, mib) < 0.05


@pytest.mark.parametrize(
    "layout, mib",
    [
        ("A" * 7 + "M" * 7, 119),  # Inter 1:1
        ("MMAMMMAMMMAMM", 58),  # Inter 1:3
        ("MMMAMMMAMMMMM", 43),  # Inter 1:5
        ("MMMMMMAMMMMMM", 28),  # Inter 1:12
    ],
)
def test_inter_ratio_caches_of_the_appendix(layout, mib):
    assert rel(cost("inter-1b", f"model.layout={layout}").cache_mib, mib) < 0.05


def test_intra_every_layer_hybrid_cache():
    """Appendix: Intra 1:0 (13 H) 180 MiB, also the 1152:1152 split's figure."""
    assert rel(cost("intra-1b", "model.layout=" + "H" * 13).cache_mib, 180) < 0.05


def test_cache_scales_with_dtype():
    bf16 = cost("inter-1b").cache_bytes
    assert cost("inter-1b", dtype="fp16").cache_bytes == bf16
    assert cost("inter-1b", dtype="fp32").cache_bytes == 2 * bf16
    with pytest.raises(ValueError, match="unknown dtype"):
        cost("inter-1b", dtype="int8")


def test_attention_cache_grows_linearly_with_context():
    assert cost("llama-1b", context=16384).cache_bytes == 2 * cost("llama-1b").cache_bytes


@pytest.mark.parametrize("name", ["mamba2-1b", "mamba2-3b", "mamba2-100m"])
def test_mamba_cache_independent_of_context(name):
    sizes = {cost(name, context=length).cache_bytes for length in (1, 100, 2048, 8192, 32768, 131072)}
    assert len(sizes) == 1


def test_sliding_window_cache_stops_growing_beyond_window_plus_sinks():
    config = paper("swa-1b")
    span = config.sliding_window.window + config.sliding_window.sinks
    assert span == 576

    def w_block_cache(length):
        blocks = [b for b in model_cost(config, length).blocks if b.symbol == "W"]
        assert len(blocks) == 13
        assert len({b.cache_bytes for b in blocks}) == 1
        return blocks[0].cache_bytes

    per_token = w_block_cache(1)
    assert per_token == 2 * 8 * (64 + 64)  # bf16 · N_kv · (d_k + d_v)
    for length in (2, 64, 575, 576):
        assert w_block_cache(length) == per_token * length
    for length in (577, 1024, 8192, 65536):
        assert w_block_cache(length) == per_token * span
    # the global blocks keep growing
    a_blocks = [b for b in model_cost(config, 65536).blocks if b.symbol == "A"]
    assert all(b.cache_bytes == per_token * 65536 for b in a_blocks)


# --- FLOPs (the hybrid paper's cost formulas and results) ---------------------------------------------------------------------


def test_llama_1b_budget_is_4_5e20_at_60b_tokens():
    assert rel(cost("llama-1b").flops_per_token * 60e9, 4.5e20) < 0.03


@pytest.mark.parametrize("name", ["inter-1b", "intra-1b"])
def test_hybrids_at_60b_tokens_are_3_7e20(name):
    """Brief §7: Inter-H / Intra-H at 60B tokens spend 3.7e20 FLOPs."""
    assert rel(cost(name).flops_per_token * 60e9, 3.7e20) < 0.03


@pytest.mark.parametrize(
    "name, billions",
    [("llama-1b", 60), ("mamba2-1b", 73), ("inter-1b", 73), ("intra-1b", 72), ("swa-1b", 71)],
)
def test_flops_matched_token_counts(name, billions):
    """Brief §7: the FLOPs-matched runs at 4.5e20."""
    tokens = 4.5e20 / cost(name).flops_per_token
    assert rel(tokens, billions * 1e9) < 0.05


def test_attention_uses_about_18_percent_more_flops_than_mamba_with_the_head():
    """Brief §2's '≈18 %' holds when the output head is counted (17 %); without it the ratio is
    ≈22 %, the ratio the FLOPs-matched token counts 73B / 60B imply."""
    llama, mamba = cost("llama-1b"), cost("mamba2-1b")
    with_head = llama.flops_per_token_with_head / mamba.flops_per_token_with_head
    assert abs(with_head - 1.18) < 0.02
    assert rel(llama.flops_per_token / mamba.flops_per_token, 73 / 60) < 0.01
    assert llama.flops_per_token_with_head - llama.flops_per_token == 6 * 2048 * 128256


def test_attention_flops_formula():
    """Brief §2: attention 12·d_model·L(L+1)/2 per sequence (H·d_head = d_model)."""
    config = paper("llama-1b")
    for length in (1, 7, 512, CONTEXT):
        assert attention_sequence_flops(config.attention, length) == 12 * 2048 * length * (length + 1) / 2


def test_swa_flops_formula():
    """Brief §2: 12·d_model·L_w·((L_w+1)/2 + (L − L_w)), L_w = window + sink."""
    attention = paper("swa-1b").attention
    l_w = 576
    for length in (577, 1000, CONTEXT, 32768):
        expected = 12 * 2048 * l_w * ((l_w + 1) / 2 + (length - l_w))
        assert attention_sequence_flops(attention, length, l_w) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("length", [1, 100, 576, 8192])
def test_swa_equals_full_attention_when_the_window_covers_the_sequence(length):
    attention = paper("swa-1b").attention
    full = attention_sequence_flops(attention, length)
    for window in (length, length + 1, 10 * length):
        assert attention_sequence_flops(attention, length, window) == full
    # the paper's SWA formula with L_w = L is the full-attention formula
    assert 12 * 2048 * length * ((length + 1) / 2 + 0) == pytest.approx(full)
    assert causal_pairs(length, length) == causal_pairs(length) == length * (length + 1) / 2


def test_swa_model_with_covering_window_costs_like_llama():
    wide = cost("swa-1b", "model.sliding_window.window=8192", "model.sliding_window.sinks=0")
    llama = cost("llama-1b")
    assert wide.layout == "WWWWAWWWAWWWAWWW"
    assert wide.params == llama.params
    assert wide.flops_per_token == pytest.approx(llama.flops_per_token, rel=1e-12)
    assert wide.cache_bytes == llama.cache_bytes


def test_sliding_window_saves_flops_at_long_context():
    assert cost("swa-1b").flops_per_token < cost("llama-1b").flops_per_token


def test_mamba_flops_formula():
    """Brief §2: Mamba 3·L·(9·d_ssm·d_state + 2·d_ssm), linear in L."""
    for length in (1, 512, CONTEXT):
        assert mamba_sequence_flops(4096, 128, length) == 3 * length * (9 * 4096 * 128 + 2 * 4096)


def test_block_flops_are_6_params_plus_the_mixer_term():
    c = cost("inter-1b")
    for block in c.blocks:
        if block.symbol == "A":
            extra = 12 * 2048 * (CONTEXT + 1) / 2
        else:
            extra = 3 * (9 * 4096 * 128 + 2 * 4096)
        assert block.flops_per_token == pytest.approx(6 * block.params + extra, rel=1e-12)
    assert c.flops_per_token == pytest.approx(sum(b.flops_per_token for b in c.blocks) + 6 * 2048, rel=1e-12)


def test_mamba_flops_per_token_independent_of_context():
    assert cost("mamba2-1b", context=1024).flops_per_token == cost("mamba2-1b", context=65536).flops_per_token


def test_default_context_is_the_configs():
    config = paper("llama-1b")
    assert model_cost(config).context == config.context_length == CONTEXT


# --- exactness: the cost model counts exactly the parameters of the built modules ----------------


def assert_exact(config):
    model = build_model(config, device="meta")
    c = model_cost(config.model)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert c.params == sum(p.numel() for p in model.parameters())
    assert len(model.blocks) == len(c.blocks) == len(config.model.layout)
    for block, block_cost in zip(model.blocks, c.blocks):
        assert block.symbol == block_cost.symbol
        assert block_cost.params == sum(p.numel() for p in block.parameters()), block_cost
    embedding = model.embed.weight.numel() + (model.head.weight.numel() if model.head is not None else 0)
    assert c.non_embedding_params == c.params - embedding


@pytest.mark.parametrize("path", LM_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_params_exact_for_every_preset(path):
    assert_exact(load_config(path))


HYBRID_VARIANTS = [
    combo
    for combo in itertools.product(
        ["none", "group"], ["none", "vector", "scalar", "gate"], ["add", "diff", "concat"], [False, True], ["joint", "separate"]
    )
    if not (combo[2] == "concat" and combo[4] == "separate")
]


def hybrid_overrides(norm, scale, fusion, share_value, out_proj):
    return [
        f"model.hybrid.norm={norm}",
        f"model.hybrid.scale={scale}",
        f"model.hybrid.fusion={fusion}",
        f"model.hybrid.share_value={str(share_value).lower()}",
        f"model.hybrid.out_proj={out_proj}",
    ]


@pytest.mark.parametrize("variant", HYBRID_VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_params_exact_for_every_hybrid_variant(variant):
    config = load_config(TINY / "intra.yaml", hybrid_overrides(*variant))
    assert (config.model.hybrid.norm, config.model.hybrid.scale, config.model.hybrid.fusion) == variant[:3]
    assert_exact(config)


def test_hybrid_variant_count():
    assert len(HYBRID_VARIANTS) == 2 * 4 * 3 * 2 * 2 - 2 * 4 * 2


@pytest.mark.parametrize("share_value", ["false", "true"])
def test_concat_with_separate_projections_is_rejected(share_value):
    with pytest.raises(ConfigError, match="model.hybrid: fusion=concat with out_proj=separate"):
        load_config(
            TINY / "intra.yaml",
            ["model.hybrid.fusion=concat", "model.hybrid.out_proj=separate", f"model.hybrid.share_value={share_value}"],
        )


@pytest.mark.parametrize(
    "path, overrides",
    [
        ("intra-moe.yaml", []),
        ("intra-moe.yaml", ["model.ffn.moe.n_shared=0"]),
        ("intra-moe.yaml", ["model.ffn.moe.n_shared=2", "model.ffn.moe.top_k=2"]),
        ("intra-moe.yaml", ["model.ffn.moe.d_expert=96", "model.ffn.moe.n_experts=4"]),
        ("intra-moe.yaml", ["model.tie_embeddings=false"]),
        ("transformer.yaml", ["model.ffn.kind=moe"]),
        ("mamba2.yaml", ["model.ffn.kind=moe", "model.ffn.moe.n_experts=2"]),
        ("transformer.yaml", ["model.tie_embeddings=false"]),
        ("transformer.yaml", ["model.ffn.kind=none"]),
        ("mamba2.yaml", ["model.ffn.kind=none"]),
        ("inter.yaml", ["model.mamba.n_groups=2", "model.mamba.d_state=16", "model.mamba.conv_kernel=3"]),
        ("inter.yaml", ["model.mamba.d_ssm=null", "model.mamba.expand=3"]),
        ("intra.yaml", ["model.hybrid.mamba.n_groups=2", "model.hybrid.attention.n_kv_heads=2"]),
        (
            "intra.yaml",
            ["model.hybrid.attention.v_head_dim=32", "model.hybrid.fusion=concat", "model.hybrid.out_proj=joint"],
        ),
        ("intra.yaml", ["model.hybrid.attention.v_head_dim=48", "model.hybrid.out_proj=separate"]),
        ("intra.yaml", ["model.layout=HHHH"]),
        ("swa.yaml", ["model.attention.head_dim=16"]),
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(v) or "default",
)
def test_params_exact_for_moe_and_other_variants(path, overrides):
    assert_exact(load_config(TINY / path, overrides))


def test_moe_flops_count_only_the_experts_a_token_uses():
    """Top-1 of 8 routed + 1 shared expert of width w does the work of a dense SwiGLU of width 2w,
    plus the router; the parameter count still holds all experts."""
    moe = load_config(TINY / "intra-moe.yaml").model
    width = moe.ffn.expert_width
    dense = load_config(TINY / "intra-moe.yaml", ["model.ffn.kind=swiglu", f"model.ffn.d_ffn={2 * width}"]).model
    moe_cost, dense_cost = model_cost(moe, 256), model_cost(dense, 256)
    router = moe.d_model * moe.ffn.moe.n_experts
    assert moe_cost.flops_per_token == pytest.approx(dense_cost.flops_per_token + 6 * router * moe.n_layers)
    assert moe_cost.params > dense_cost.params + 6 * 3 * moe.d_model * width * moe.n_layers

"""Every block kind is causal: changing token t changes no logit before t.

Each check also requires that the change *does* reach position t and the position after it (which
only the sequence mixer can carry), so no case passes because the perturbation went nowhere. Sizes
are tiny (d_model 32, 40 tokens) with Mamba chunk_size 8 so perturbations cross chunk boundaries.
Also: sliding-window blocks see exactly their window plus sinks, every tiny preset builds and runs,
and MoE bias balancing moves biases the right way.
"""

import itertools
from pathlib import Path

import pytest
import torch
from entropy_presets import preset_overrides

import strata
from strata.config import validate_config
from strata.data.levels import model_inputs
from strata.models import LanguageModel, build_model
from strata.nn.mlp import MoE, moe_layers

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
PRESETS = sorted(CONFIGS.glob("*.yaml"))

VOCAB = 64
LENGTH = 40
# First token, inside a chunk, both sides of the chunk boundaries at 8 and 16, mid-sequence, last token.
POSITIONS = (0, 3, 7, 8, 9, 16, 25, 39)
# "unchanged": exactly 0 for every block kind except MoE, where changing one token can change which
# tokens share an expert's matmul and so the rounding of the others (observed <= 5e-7).
SAME = 1e-5
CHANGED = 1e-4  # "changed": observed changes are >= 5e-2 at init_std 0.1

HYBRID_DEFAULTS = dict(norm="group", scale="none", fusion="diff", share_value=False, out_proj="separate")


def model_config(layout, window=8, sinks=3, **hybrid_axes):
    """A tiny config with every section present, so any layout string builds."""
    hybrid = {
        "attention": {"n_heads": 2, "n_kv_heads": 1, "head_dim": 8, "rope": {"theta": 10000.0}},
        "mamba": {"d_ssm": 32, "d_state": 8, "head_dim": 8, "chunk_size": 8},
        **{**HYBRID_DEFAULTS, **hybrid_axes},
    }
    data = {
        "vocab_size": VOCAB,
        "d_model": 32,
        "layout": layout,
        "context_length": 64,
        "init_std": 0.1,
        "attention": {"n_heads": 4, "n_kv_heads": 2, "rope": {"theta": 10000.0}},
        "sliding_window": {"window": window, "sinks": sinks},
        "mamba": {"d_ssm": 64, "d_state": 8, "head_dim": 16, "chunk_size": 8},
        "hybrid": hybrid,
        "ffn": {"kind": "swiglu", "d_ffn": 64},
    }
    return validate_config({"model": data}).model


def build(config, seed=0) -> LanguageModel:
    torch.manual_seed(seed)
    return build_model(config).eval()


def perturbation_diffs(model, positions=POSITIONS, length=LENGTH, seed=0):
    """{t: max |Δlogit| per position [T]} when token t alone is replaced by a different token.

    All perturbed sequences run in one batch with the unperturbed one (row 0)."""
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(0, vocab, (length,), generator=generator)
    rows = [base]
    for t in positions:
        row = base.clone()
        row[t] = (row[t] + torch.randint(1, vocab, (), generator=generator)) % vocab  # always a different token
        rows.append(row)
    batch = torch.stack(rows)
    with torch.no_grad():
        logits = model(batch, **model_inputs(model, batch))
    assert torch.isfinite(logits).all()
    return {t: (logits[i + 1] - logits[0]).abs().amax(-1) for i, t in enumerate(positions)}


def assert_causal(model, positions=POSITIONS, length=LENGTH):
    for t, diff in perturbation_diffs(model, positions, length).items():
        if t > 0:
            leaked = (diff[:t] > SAME).nonzero().flatten().tolist()
            assert not leaked, f"token {t} changed logits at earlier positions {leaked}"
        assert diff[t] > CHANGED, f"token {t} did not change its own logits"
        if t + 1 < length:
            assert diff[t + 1] > CHANGED, f"token {t} did not reach position {t + 1}: the mixer passed nothing on"


# ---------------------------------------------------------------------------------------------
# One block kind at a time


@pytest.mark.parametrize("layout", ["A", "M", "AA", "MM"])
def test_attention_and_mamba_are_causal(layout):
    assert_causal(build(model_config(layout)))


@pytest.mark.parametrize("window,sinks", [(8, 3), (8, 0), (5, 1)])
def test_sliding_window_is_causal(window, sinks):
    assert window + sinks < LENGTH  # the masked path, not the plain causal fallback
    assert_causal(build(model_config("WW", window=window, sinks=sinks)))


@pytest.mark.parametrize(
    "window,sinks",
    [
        (8, 3),
        (8, 0),
        (1, 0),  # each token sees only itself
        (1, 2),
        (30, 9),  # window + sinks == LENGTH - 1: exactly one (query, key) pair is out of reach
        (30, 10),  # window + sinks == LENGTH: the full causal path
        (64, 0),  # window longer than the sequence
    ],
)
def test_sliding_window_sees_exactly_window_and_sinks(window, sinks):
    """One W layer (plus its per-token FFN): token j reaches query i iff j <= i and
    (i - j < window or j < sinks). Further back, non-sink tokens have no influence at all."""
    model = build(model_config("W", window=window, sinks=sinks))
    positions = tuple(range(LENGTH))
    diffs = perturbation_diffs(model, positions)
    i = torch.arange(LENGTH)
    for j, diff in diffs.items():
        visible = (j <= i) & ((i - j < window) | (j < sinks))
        if (~visible).any():
            assert diff[~visible].max() <= SAME, (
                f"key {j} reached queries {i[~visible & (diff > SAME)].tolist()} outside window={window}, sinks={sinks}"
            )
        assert diff[visible].min() > CHANGED, f"key {j} did not reach queries {i[visible & (diff <= CHANGED)].tolist()}"


HYBRID_CASES = [
    dict(norm=norm, scale=scale, fusion=fusion, out_proj=out_proj, share_value=share_value)
    for norm, scale, (fusion, out_proj), share_value in itertools.product(
        ["none", "group"],
        ["none", "vector", "scalar", "gate"],
        [("add", "joint"), ("add", "separate"), ("diff", "joint"), ("diff", "separate"), ("concat", "joint")],
        [False, True],
    )
]


def hybrid_id(axes):
    return "-".join(f"share{int(v)}" if isinstance(v, bool) else str(v) for v in axes.values())


@pytest.mark.parametrize("axes", HYBRID_CASES, ids=hybrid_id)
def test_hybrid_is_causal(axes):
    """Every combination of the intra-layer hybrid's design axes (concat only with a joint projection)."""
    model = build(model_config("H", **axes))
    mixer = model.blocks[0].mixer
    assert all(getattr(mixer.config, key) == value for key, value in axes.items())
    assert_causal(model, positions=(0, 7, 8, 21, 39))


@pytest.mark.parametrize("share_value", [False, True])
def test_hybrid_branches_are_each_causal(share_value):
    """Causality of the fused output could hide a leak cancelled by the fusion; check the branches."""
    model = build(model_config("H", fusion="diff", share_value=share_value, scale="gate"))
    mixer = model.blocks[0].mixer
    x = torch.randn(1, LENGTH, 32, generator=torch.Generator().manual_seed(0))
    for t in (0, 8, 20):
        y = x.clone()
        y[:, t] += 1.0
        with torch.no_grad():
            for before, after in zip(mixer.branches(x), mixer.branches(y)):
                diff = (before - after).abs().amax(-1)[0]
                if t:
                    assert diff[:t].max() <= SAME
                assert diff[t] > CHANGED and diff[t + 1] > CHANGED


def test_mixed_layout_is_causal():
    model = build(model_config("MAWHM", window=6, sinks=2))
    assert [block.symbol for block in model.blocks] == list("MAWHM")
    assert_causal(model)


def moe_model_config(**moe):
    return strata.load_config(
        CONFIGS / "intra-moe.yaml",
        overrides=[
            "model.d_model=32",
            f"model.vocab_size={VOCAB}",
            "model.layout.layers=3",  # 1:5 scatter over 3 layers -> "MHM"
            "model.init_std=0.1",
            "model.mamba={d_ssm: 64, d_state: 8, head_dim: 16, chunk_size: 8}",
            "model.hybrid.attention.head_dim=8",
            "model.hybrid.mamba={d_ssm: 32, d_state: 8, head_dim: 8, chunk_size: 8}",
            "model.ffn.d_ffn=64",
            *[f"model.ffn.moe.{key}={value}" for key, value in moe.items()],
        ],
    ).model


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_model_is_causal(top_k):
    config = moe_model_config(n_experts=4, top_k=top_k)
    assert config.layout == "MHM" and config.ffn.kind == "moe"
    model = build(config)
    assert len(moe_layers(model)) == 3
    assert_causal(model)
    model.train()  # routing is per token in training too (only the load counters differ)
    assert_causal(model)


# ---------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_tiny_preset_builds_and_runs(path):
    config = strata.load_config(path, preset_overrides(path)).model
    model = build(config)
    tokens = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens, **model_inputs(model, tokens))
    assert logits.shape == (2, 17, config.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_tiny_preset_is_causal(path):
    assert_causal(build(strata.load_config(path, preset_overrides(path)).model), positions=(0, 5, 16), length=17)


def test_tiny_presets_cover_every_block_kind():
    layouts = "".join(strata.load_config(path).model.layout.replace(";", "") for path in PRESETS)
    assert set(layouts) == {"A", "W", "M", "G", "K", "H"}


# ---------------------------------------------------------------------------------------------
# MoE bias balancing


def test_update_balance_bias_lowers_overloaded_and_raises_underloaded():
    rate = 0.01
    config = moe_model_config(n_experts=4, top_k=1, bias_update_rate=rate)
    model = build(config).train()
    moes = moe_layers(model)
    # Start from an imbalance: expert 0 is favoured in every layer, so it takes (nearly) every token.
    for moe in moes:
        moe.balance_bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(tokens)
    before = [moe.balance_bias.clone() for moe in moes]
    loads = [moe.tokens_per_expert.clone() for moe in moes]
    for load in loads:
        assert load.sum() == 2 * 24  # top-1: one expert per token
        assert load[0] > load.mean() and (load[1:] < load.mean()).all()

    model.update_balance_biases()

    for moe, old, _load in zip(moes, before, loads):
        delta = moe.balance_bias - old
        # over-loaded expert 0 down by the rate, the under-loaded ones up (float32: 5.0 - 0.01 rounds)
        torch.testing.assert_close(delta, torch.tensor([-rate, rate, rate, rate]), atol=1e-6, rtol=0)
        assert moe.tokens_per_expert.sum() == 0  # counters reset after each update


@pytest.mark.parametrize("top_k", [1, 2])
def test_update_balance_bias_follows_the_sign_of_mean_minus_load(top_k):
    """From zero biases and natural routing: each expert moves by rate·sign(mean load − its load)."""
    rate = 1e-3
    model = build(moe_model_config(n_experts=8, top_k=top_k, bias_update_rate=rate)).train()
    tokens = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(tokens)
    loads = [moe.tokens_per_expert.clone() for moe in moe_layers(model)]
    assert all(load.sum() == 4 * 32 * top_k for load in loads)
    assert any((load != load.mean()).any() for load in loads)  # something to balance
    model.update_balance_biases()
    for moe, load in zip(moe_layers(model), loads):
        expected = rate * torch.sign(load.mean() - load)
        torch.testing.assert_close(moe.balance_bias, expected)
        over, under = load > load.mean(), load < load.mean()
        assert (moe.balance_bias[over] < 0).all() and (moe.balance_bias[under] > 0).all()


def test_eval_forward_does_not_count_load():
    model = build(moe_model_config(n_experts=4, top_k=1, bias_update_rate=0.1)).eval()
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2)))
    assert all(moe.tokens_per_expert.sum() == 0 for moe in moe_layers(model))
    model.update_balance_biases()
    assert all((moe.balance_bias == 0).all() for moe in moe_layers(model))


def test_balance_bias_chooses_experts_but_does_not_weight_them():
    """With top-2 routing forced onto experts 0 and 1 by the bias, the output is those experts mixed
    by their own sigmoid scores normalised to sum to one; the (huge) bias does not enter the weights."""
    config = moe_model_config(n_experts=4, top_k=2, n_shared=0)
    moe = moe_layers(build(config))[0]
    assert isinstance(moe, MoE) and len(moe.shared) == 0
    x = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        moe.balance_bias.copy_(torch.tensor([100.0, 100.0, 0.0, 0.0]))
        scores = torch.sigmoid(moe.router(x))
        w0, w1 = (scores[..., :2] / scores[..., :2].sum(-1, keepdim=True)).unbind(-1)
        expected = w0[..., None] * moe.experts[0](x) + w1[..., None] * moe.experts[1](x)
        torch.testing.assert_close(moe(x), expected, atol=1e-6, rtol=1e-5)

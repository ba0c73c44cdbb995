"""The intra-layer hybrid with Gated DeltaNet heads as its linear branch (``hybrid.branches:
attn_gdn``): the hybrid paper's intra design, attention beside the linear mixer of Qwen3-Next and
OLMo Hybrid.

Beside what tests/test_hybrid_designs.py holds every design to (a training step, causality of the
logits, cached decoding and generation against the full forward, the exact parameter count, the
cache's bytes, the fused output against its formula): how its config sections are required, its
names, its costs computed here from the formulas, packed documents, a carried state, each branch's
causality and a meta build.
"""

from pathlib import Path

import pytest
import torch

from strata import ConfigError, build_model, load_config
from strata.cost.model import hybrid_params, model_cost
from strata.models import init_weights
from strata.models.lm import RESIDUAL_PROJECTIONS
from strata.nn.attention import Attention
from strata.nn.gated_deltanet import GatedDeltaNet
from strata.nn.hybrid import OUTPUT_PROJECTIONS, branch_names
from test_causality import CHANGED, LENGTH, SAME, assert_causal, build, model_config
from test_segments import LENGTHS, assert_close_to_scale, segment_ids

INTRA = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "intra.yaml"
H = "model.hybrid."
# intra.yaml (d_model 128; attention 2 heads, 1 KV head, Q/K 32) with a Gated DeltaNet branch as
# wide as its Mamba branch: 128 channels in 4 value heads of 32, a q/k head of 32 for every two.
GDN = H + "gdn={n_heads: 2, n_v_heads: 4, head_dim: 32, v_head_dim: 32, chunk_size: 32}"


def config(*overrides: str):
    return load_config(INTRA, ["model.init_std=0.1", GDN, H + "branches=attn_gdn", *overrides])


def model(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(config(*overrides)).eval()


def config_error(overrides) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(INTRA, overrides)
    assert "\n" not in str(error.value)
    return str(error.value)


# --- configuration ----------------------------------------------------------------------------


def test_the_sections_its_branches_use_are_required_and_no_others():
    assert "model.hybrid.gdn: required: branches=attn_gdn builds a branch" in config_error([H + "branches=attn_gdn"])
    assert "model.hybrid.mamba: required: branches=attn_ssm" in config_error([H + "mamba=null"])
    without_mamba = load_config(INTRA, [GDN, H + "branches=attn_gdn", H + "mamba=null"]).model.hybrid
    assert without_mamba.mamba is None and without_mamba.branch_kinds == ("attention", "gdn")
    assert load_config(INTRA, [H + "branches=ssm_ssm", H + "attention=null"]).model.hybrid.attention is None


def test_attention_values_default_to_the_gdn_branch_width():
    """As wide as the linear branch, whose width here (3 value heads of 32 = 96) is not the Mamba
    section's (128); a width that is given stays."""
    narrow = H + "gdn={n_heads: 3, head_dim: 16, v_head_dim: 32}"
    attention = load_config(INTRA, [narrow, H + "branches=attn_gdn"]).model.hybrid.attention
    assert attention.v_head_dim == 96 // 2
    given = load_config(INTRA, [narrow, H + "branches=attn_gdn", H + "attention.v_head_dim=40"]).model.hybrid.attention
    assert given.v_head_dim == 40
    # With attn_ssm the same file sizes them by the Mamba branch, as it always did.
    assert load_config(INTRA, [narrow]).model.hybrid.attention.v_head_dim == 128 // 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([H + "share_value=true"], ("model.hybrid.share_value: feeds the attention's values to the Mamba branch; "
                                    "it needs branches=attn_ssm, not attn_gdn")),
        ([H + "attention.n_heads=3", H + "attention.n_kv_heads=1"],
         "model.hybrid.attention.n_heads: 3 does not divide hybrid.gdn.value_width (128)"),
        ([H + "attention.v_head_dim=32", H + "out_proj=joint"],
         ("model.hybrid.attention.v_head_dim: joint diff fusion needs equal branch widths: attention values 64 "
          "vs gdn value width 128")),
    ],
)
def test_bad_gdn_designs_stop_with_one_line_naming_the_key(overrides, message):
    assert message in config_error([GDN, H + "branches=attn_gdn", *overrides])


# --- names and initialisation -----------------------------------------------------------------


def test_branches_are_named_attn_and_gdn_and_project_into_the_residual_stream():
    lm = model("model.layout=MH")
    mixer = lm.blocks[1].mixer
    assert mixer.names == ("attn", "gdn") == branch_names("attn_gdn")
    assert isinstance(mixer.attn, Attention) and isinstance(mixer.gdn, GatedDeltaNet)
    assert mixer.gdn.out_proj is None  # the hybrid projects (gdn_out), not the mixer
    assert [name for name, _ in mixer.named_children()] == ["attn", "gdn", "attn_norm", "gdn_norm", "attn_out", "gdn_out"]
    # The other designs keep their checkpoint names.
    assert (branch_names("attn_ssm"), branch_names("attn_attn"), branch_names("ssm_ssm")) == (
        ("attn", "ssm"), ("attn1", "attn2"), ("ssm1", "ssm2"))
    assert "gdn_out" in OUTPUT_PROJECTIONS and "gdn_out" in RESIDUAL_PROJECTIONS
    # GPT-2's residual rule: std / sqrt(2 · blocks) = 0.1 / 2 here, as the attention's projection.
    for name in ("gdn_out", "attn_out"):
        assert getattr(mixer, name).weight.std().item() == pytest.approx(0.05, rel=0.03)
    assert mixer.gdn.in_proj.weight.std().item() == pytest.approx(0.1, rel=0.03)


def test_a_meta_build_then_init_weights_is_the_seeded_build():
    """The Gated DeltaNet branch draws its decays and steps in construction's order."""
    torch.manual_seed(0)
    built = build_model(config("model.layout=MHMH", H + "scale=gate"))
    torch.manual_seed(0)
    meta = build_model(config("model.layout=MHMH", H + "scale=gate"), device="meta")
    meta.to_empty(device="cpu")
    init_weights(meta)
    expected = built.state_dict()
    assert meta.state_dict().keys() == expected.keys()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in meta.state_dict().items())


# --- cost -------------------------------------------------------------------------------------

# One H block of the config above, by hand:
#   attention branch, no output projection: 128·((2 + 1)·32 + 1·64) = 20,480
#   Gated DeltaNet branch: in_proj 128·(q 64 + k 64 + v 128 + z 128 + b 4 + a 4) = 50,176,
#     conv 256·4 = 1,024, A_log 4, dt_bias 4, output norm 32 (one head's width): 51,240
#   GroupNorm per branch 2·(128 + 128) = 512; one projection per branch 2·128·128 = 32,768
#   mixer 105,000. At 1,000 tokens:
#   cache: attention 1·(32 + 64)·1000 = 96,000 elements; Gated DeltaNet 4·32·32 + 4·(2·64 + 128)
#     = 5,120; 101,120 elements = 202,240 bytes in bf16.
#   sequence FLOPs a token: attention 6·2·(32 + 64)·(1000·1001/2)/1000 = 576,576; Gated DeltaNet
#     3·(9·4·32·32 + 2·4·32) = 111,360; together 687,936.
MIXER_PARAMS, CACHE_BYTES, SEQUENCE_FLOPS = 105_000, 202_240, 687_936


def test_costs_are_the_formulas_and_the_built_model():
    built = config("model.layout=MH")
    lm = build_model(built, device="meta")
    mixer = lm.blocks[1].mixer
    assert hybrid_params(128, built.model.hybrid) == MIXER_PARAMS == sum(p.numel() for p in mixer.parameters())
    hybrid = model_cost(built.model, 1000, "bf16").blocks[1]
    assert hybrid.symbol == "H" and hybrid.cache_bytes == CACHE_BYTES
    assert hybrid.flops_per_token - 6 * hybrid.params == pytest.approx(SEQUENCE_FLOPS)


# --- packed documents, carried state, causality -----------------------------------------------

ROUNDING = 1e-4  # float32 logits computed in another order (chunks cut elsewhere)


def test_packed_documents_equal_the_documents_alone():
    """A row of three documents gives the logits and gradients of each run alone; rewriting the
    first document leaves the others' logits as they were (tests/test_segments.py's check)."""
    lm = model("model.layout=MHMH").train()
    tokens = torch.randint(0, 259, (2, sum(LENGTHS)), generator=torch.Generator().manual_seed(1))
    probe = torch.randn(2, sum(LENGTHS), 259, generator=torch.Generator().manual_seed(2))
    parameters = list(lm.parameters())

    packed = lm(tokens, segment_ids=segment_ids(LENGTHS, batch=2))
    packed_grads = torch.autograd.grad((packed * probe).sum(), parameters)
    alone = [lm(part) for part in tokens.split(LENGTHS, dim=1)]
    alone_loss = sum((logits * part).sum() for logits, part in zip(alone, probe.split(LENGTHS, dim=1)))
    alone_grads = torch.autograd.grad(alone_loss, parameters)
    # Rounding alone: a document run alone falls elsewhere in the chunks; measured up to 6e-5 on
    # logits of magnitude 5 (twice the plain families' 3e-5: the branch GroupNorms scale the
    # Gated DeltaNet heads' rounding up). A leak moves them by >= 5e-2 (tests/test_causality.py).
    torch.testing.assert_close(packed, torch.cat(alone, 1), atol=ROUNDING, rtol=1e-5)
    # In one mode (no autograd) the same packed row computes the other documents identically,
    # whatever the first one holds (measured: not a bit changes).
    changed = tokens.clone()
    changed[:, : LENGTHS[0]] = torch.randint(0, 259, (2, LENGTHS[0]), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before, after = (lm(row, segment_ids=segment_ids(LENGTHS, batch=2))[:, LENGTHS[0] :] for row in (tokens, changed))
    torch.testing.assert_close(after, before, atol=SAME, rtol=0)
    for (name, _), ours, reference in zip(lm.named_parameters(), packed_grads, alone_grads, strict=True):
        assert_close_to_scale(ours, reference, name)


def test_a_carried_state_continues_the_sequence():
    """model(x1, state=s), then x2 and x3, equals model(x1 ++ x2 ++ x3) in logits and gradients;
    the cuts fall inside a Gated DeltaNet chunk (32) and one part is a single step."""
    lm = model("model.layout=MHMH").train()
    tokens = torch.randint(0, 259, (2, 150), generator=torch.Generator().manual_seed(1))
    probe = torch.randn(2, 150, 259, generator=torch.Generator().manual_seed(2))
    parameters = list(lm.parameters())
    whole = lm(tokens)
    whole_grads = torch.autograd.grad((whole * probe).sum(), parameters)
    state = lm.carried_state()
    parts = [lm(part, state=state) for part in tokens.split([45, 1, 104], dim=1)]
    assert state.length == 150
    assert [type(branch).__name__ for branch in state.layers[1].branches] == ["CarriedKV", "CarriedRecurrent"]
    carried_loss = sum((logits * p).sum() for logits, p in zip(parts, probe.split([45, 1, 104], 1)))
    carried_grads = torch.autograd.grad(carried_loss, parameters)
    # (3e-5, as tests/test_segments.py: the parts fall elsewhere in the chunks and round differently.)
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=3e-5, rtol=1e-5)
    for (name, _), ours, reference in zip(lm.named_parameters(), carried_grads, whole_grads, strict=True):
        assert_close_to_scale(ours, reference, name)


# tests/test_causality.py's tiny model (d_model 32) with a Gated DeltaNet branch as wide as its
# Mamba branch (32), in chunks of 8 so that the perturbations cross chunk boundaries.
TINY_GDN = {"n_heads": 2, "head_dim": 8, "v_head_dim": 16, "chunk_size": 8}
CAUSAL_CASES = [
    {"norm": "group", "scale": "none", "fusion": "diff", "out_proj": "separate"},
    {"norm": "none", "scale": "gate", "fusion": "add", "out_proj": "joint"},
    {"norm": "group", "scale": "vector", "fusion": "concat", "out_proj": "joint"},
    {"norm": "group", "scale": "lambda", "fusion": "diff", "out_proj": "separate"},
]


@pytest.mark.parametrize("axes", CAUSAL_CASES, ids=lambda axes: "-".join(axes.values()))
def test_it_is_causal(axes):
    """Changing token t changes no logit before t, and does change those at t and t + 1."""
    lm = build(model_config("MH", branches="attn_gdn", gdn=TINY_GDN, **axes))
    assert lm.blocks[1].mixer.names == ("attn", "gdn")
    assert_causal(lm, positions=(0, 7, 8, 21, 39))


def test_each_branch_is_causal():
    """Causality of the fused output could hide a leak that the fusion cancels; each branch's
    normalised output on its own is causal too."""
    mixer = build(model_config("H", branches="attn_gdn", gdn=TINY_GDN, scale="gate")).blocks[0].mixer
    x = torch.randn(1, LENGTH, 32, generator=torch.Generator().manual_seed(0))
    for t in (0, 8, 20):
        y = x.clone()
        y[:, t] += 1.0
        with torch.no_grad():
            for before, after in zip(mixer.branches(x), mixer.branches(y), strict=True):
                diff = (before - after).abs().amax(-1)[0]
                if t:
                    assert diff[:t].max() <= SAME
                assert diff[t] > CHANGED and diff[t + 1] > CHANGED

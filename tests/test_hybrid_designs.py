"""The hybrid paper's Table 6 baselines beside the intra-layer hybrid: two attention branches (T/T,
the Differential Transformer), two Mamba-2 branches (M/M, Differential Mamba), Diff-T's λ as a
scaling and the learned α mix of the paper's Appendix Q; and the hybrid with Gated DeltaNet heads
as its linear branch (attn_gdn; more of it in tests/test_intra_gdn.py).

Each design trains, is causal, decodes through its caches as the full forward computes it, and is
costed exactly. Expected values are the Differential Transformer paper's (λ_init), or computed here
from torch primitives and the formulas (the fused output, λ, cache and FLOPs), never strata's own
output.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from strata import ConfigError, build_model, load_config
from strata.cost.model import model_cost
from strata.inference.cache import StackCache
from strata.inference.generate import generate
from strata.nn.attention import Attention

INTRA = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "intra.yaml"
# name: (branches, scale, fusion); all with GroupNorm and a projection per branch (the recipe's).
DESIGNS = {
    "tt": ("attn_attn", "none", "diff"),
    "tt_lambda": ("attn_attn", "lambda", "diff"),
    "mm": ("ssm_ssm", "none", "diff"),
    "mm_lambda": ("ssm_ssm", "lambda", "diff"),
    "final_lambda": ("attn_ssm", "lambda", "diff"),
    "alpha": ("attn_ssm", "alpha", "add"),
    "gdn": ("attn_gdn", "none", "diff"),
    "gdn_gate": ("attn_gdn", "gate", "add"),
}
# The Gated DeltaNet branch of attn_gdn, as wide as intra.yaml's Mamba branch (128 channels in 4
# value heads) with a q/k head for every two value heads; every design gets the section, which
# only attn_gdn builds.
GDN = "model.hybrid.gdn={n_heads: 2, n_v_heads: 4, head_dim: 32, v_head_dim: 32, chunk_size: 32}"
LOGITS_TOL = 1e-4  # as tests/test_generate.py: fp32 logits of cached decoding against the full forward


def config(design: str, *overrides: str):
    branches, scale, fusion = DESIGNS[design]
    axes = [f"model.hybrid.branches={branches}", f"model.hybrid.scale={scale}", f"model.hybrid.fusion={fusion}"]
    return load_config(INTRA, ["model.init_std=0.1", GDN, *axes, *overrides])


def model(design: str, *overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(config(design, *overrides)).eval()


def hybrid_mixers(lm):
    return [block.mixer for block in lm.blocks if block.symbol == "H"]


# --- Diff-T's λ and Appendix Q's α -----------------------------------------------------------


def test_lambda_init_per_layer_is_the_differential_transformers():
    """λ_init = 0.8 − 0.6·exp(−0.3·(l − 1)) (Ye et al. 2024, §2.1) at layers 1, 2 and 5."""
    mixers = hybrid_mixers(model("tt_lambda", "model.layout=HHHHH"))
    expected = {1: 0.2, 2: 0.35550906759096927, 5: 0.6192834728526787}
    for layer, value in expected.items():
        assert mixers[layer - 1].lambda_init == pytest.approx(value, abs=1e-12)


def test_lambda_is_reparameterised_from_four_small_vectors():
    """λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init, the vectors as wide as a head of the
    subtracted branch and drawn from N(0, 0.1²), so λ starts near λ_init."""
    for design, head_width in (("tt_lambda", 32), ("mm_lambda", 32), ("final_lambda", 32)):
        (mixer,) = hybrid_mixers(model(design, "model.layout=MMMH"))
        q1, k1, q2, k2 = (getattr(mixer, f"lambda_{name}").detach().tolist() for name in ("q1", "k1", "q2", "k2"))
        assert len(q1) == len(k1) == len(q2) == len(k2) == head_width
        dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
        expected = math.exp(dot(q1, k1)) - math.exp(dot(q2, k2)) + 0.8 - 0.6 * math.exp(-0.3 * 3)
        assert mixer.diff_lambda().item() == pytest.approx(expected, abs=1e-6)
        values = torch.tensor(q1 + k1 + q2 + k2)
        assert 0.06 < values.std().item() < 0.14 and abs(values.mean().item()) < 0.03


def test_alpha_starts_at_one_half_in_every_layer():
    """α·Mamba + (1 − α)·attention starts with both branches weighed alike."""
    mixers = hybrid_mixers(model("alpha", "model.layout=HMHMH"))
    assert len(mixers) == 3 and all(mixer.alpha.shape == () and mixer.alpha.item() == 0.5 for mixer in mixers)


def group_norm(y, norm, heads):
    return F.group_norm(y.reshape(-1, y.shape[-1]), heads, norm.weight, norm.bias, norm.eps).reshape(y.shape)


@pytest.mark.parametrize("design", ["tt_lambda", "mm", "alpha", "gdn"])
def test_fused_output_matches_the_formula(design):
    """f(X) = W_b·(s_b·GN(M_b(X))) ⊕ W_a·(s_a·GN(M_a(X))), from the branch mixers' raw heads:
    Diff-T λ: s_b = 1 − λ_init, s_a = λ·(1 − λ_init), ⊕ = −; α: s_b = α, s_a = 1 − α, ⊕ = +."""
    (mixer,) = hybrid_mixers(model(design, "model.layout=MMH"))
    name_a, name_b = mixer.names
    branch_a, branch_b = getattr(mixer, name_a), getattr(mixer, name_b)
    x = torch.randn(2, 24, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if design == "alpha":
            mixer.alpha.fill_(0.3)
        raw = [branch.attend(x) if isinstance(branch, Attention) else branch.mix(x) for branch in (branch_a, branch_b)]
        normed = [group_norm(y, getattr(mixer, f"{name}_norm"), branch.n_heads)
                  for y, name, branch in zip(raw, mixer.names, (branch_a, branch_b))]
        if design == "tt_lambda":
            vectors = [getattr(mixer, f"lambda_{name}") for name in ("q1", "k1", "q2", "k2")]
            lam = math.exp((vectors[0] * vectors[1]).sum().item()) - math.exp((vectors[2] * vectors[3]).sum().item()) + 0.8
            lam -= 0.6 * math.exp(-0.3 * 2)  # layer 3
            keep = 0.6 * math.exp(-0.3 * 2) + 0.2  # 1 − λ_init
            scales, sign = (lam * keep, keep), -1
        elif design == "alpha":
            scales, sign = (0.7, 0.3), 1
        else:
            scales, sign = (1.0, 1.0), -1
        projected = [(s * y) @ getattr(mixer, f"{name}_out").weight.t() for s, y, name in zip(scales, normed, mixer.names)]
        expected = projected[1] + sign * projected[0]
        torch.testing.assert_close(mixer(x), expected, atol=1e-5, rtol=1e-5)


# --- every design: training, causality, caches ------------------------------------------------


@pytest.mark.parametrize("design", DESIGNS)
def test_each_design_trains_a_step(design):
    lm = model(design, "model.layout=MH").train()
    tokens = torch.randint(0, 256, (2, 41), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3)

    def loss():
        logits = lm(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    before = loss()
    before.backward()
    (mixer,) = hybrid_mixers(lm)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mixer.parameters())
    learned = {"lambda": "lambda_q1", "alpha": "alpha"}.get(DESIGNS[design][1])
    if learned:
        assert getattr(mixer, learned).grad.abs().sum() > 0
    optimizer.step()
    with torch.no_grad():
        assert loss() < before


@pytest.mark.parametrize("design", DESIGNS)
def test_each_design_is_causal(design):
    """Changing token t changes no logit before t, and does change those at t and t + 1."""
    lm = model(design, "model.layout=HMH")
    base = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(2))
    rows = [base]
    for t in (0, 7, 8, 21, 38):
        row = base.clone()
        row[t] = (row[t] + 1) % 256
        rows.append(row)
    with torch.no_grad():
        logits = lm(torch.stack(rows))
    for i, t in enumerate((0, 7, 8, 21, 38), start=1):
        diff = (logits[i] - logits[0]).abs().amax(-1)
        if t:
            assert diff[:t].max() <= 1e-5, f"token {t} reached earlier positions"
        assert diff[t] > 1e-4 and diff[t + 1] > 1e-4, f"token {t} did not reach positions {t} and {t + 1}"


@pytest.mark.parametrize("design", DESIGNS)
def test_cached_decoding_equals_the_full_forward(design):
    """A prompt, then one token at a time through the caches (two KV caches for T/T, two Mamba
    states for M/M), against the full forward at every position; and left-padded batched
    generation against recomputing each sequence."""
    lm = model(design, "model.layout=MHMH")
    tokens = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = lm(tokens)
        cache = StackCache(lm.blocks, batch_size=2, capacity=16)  # grows past its capacity
        # A prompt across the SSD chunk boundary (32), then single steps.
        steps = [lm(tokens[:, :40], cache)] + [lm(tokens[:, t : t + 1], cache) for t in range(40, 60)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=LOGITS_TOL, rtol=0)
    kinds = [type(branch).__name__ for branch in cache.layers[1].branches]
    assert kinds == {"attn_attn": ["KVCache"] * 2, "ssm_ssm": ["RecurrentCache"] * 2}.get(DESIGNS[design][0], ["KVCache", "RecurrentCache"])

    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in (1, 33, 45)]
    cached = generate(lm, prompts, 8, return_logits=True)
    recomputed = generate(lm, prompts, 8, return_logits=True, use_cache=False)
    for a, b in zip(cached, recomputed, strict=True):
        assert a.tokens == b.tokens
        torch.testing.assert_close(a.logits, b.logits, atol=LOGITS_TOL, rtol=0)


# --- cost model -------------------------------------------------------------------------------


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("out_proj", ["separate", "joint"])
def test_params_are_those_of_the_built_model(design, out_proj):
    built = config(design, f"model.hybrid.out_proj={out_proj}", "model.layout=MHMH")
    lm = build_model(built, device="meta")
    cost = model_cost(built.model)
    assert cost.params == sum(p.numel() for p in lm.parameters())
    for block, block_cost in zip(lm.blocks, cost.blocks, strict=True):
        assert block_cost.params == sum(p.numel() for p in block.parameters())


# intra.yaml's hybrid: attention 2 heads, 1 KV head, Q/K 32 and values 128 / 2 = 64 wide; Mamba-2
# d_ssm 128, d_state 32, conv 4, 1 group. Per block at 1,000 tokens, bf16:
#   T/T cache 2·(1·(32 + 64)·1000) = 192,000 elements = 384,000 B;
#   M/M cache 2·(128·32 + 4·(2·32 + 128)) = 9,728 elements = 19,456 B.
#   T/T sequence FLOPs 2·6·2·(32 + 64)·(1000·1001/2) / 1000 = 1,153,152 a token;
#   M/M 2·3·(9·128·32 + 2·128) = 222,720 a token.
@pytest.mark.parametrize("design, cache_bytes, sequence_flops", [("tt", 384_000, 1_153_152), ("mm", 19_456, 222_720)])
def test_cache_and_flops_of_two_branches_of_one_kind(design, cache_bytes, sequence_flops):
    cost = model_cost(config(design, "model.layout=MH").model, 1000, "bf16")
    hybrid = cost.blocks[1]
    assert hybrid.symbol == "H" and hybrid.cache_bytes == cache_bytes
    assert hybrid.flops_per_token - 6 * hybrid.params == pytest.approx(sequence_flops)


@pytest.mark.parametrize("design", DESIGNS)
def test_cache_memory_is_the_cost_models(design):
    lm = model(design)
    cache = StackCache(lm.blocks, batch_size=3, capacity=300)
    assert cache.nbytes == 3 * model_cost(lm.config, 300, "fp32").cache_bytes


# --- configuration errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.hybrid.branches=attn_attn", "model.hybrid.share_value=true"], "model.hybrid.share_value: feeds the attention's values"),
        (["model.hybrid.branches=ssm_ssm", "model.hybrid.share_value=true"], "needs branches=attn_ssm, not ssm_ssm"),
        (["model.hybrid.scale=lambda", "model.hybrid.fusion=add"], "model.hybrid.scale: lambda weighs the subtracted branch"),
        (["model.hybrid.scale=alpha", "model.hybrid.fusion=diff"], "model.hybrid.scale: alpha mixes the branches"),
        (["model.hybrid.branches=ssm_attn"], "model.hybrid.branches: "),
    ],
)
def test_bad_designs_stop_with_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(INTRA, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)

"""strata's modules compute the same functions as their HF transformers peers once weights are copied.

Three levels, all in fp32 at 1e-5:
  * one attention block (``Block("A")``) vs ``LlamaDecoderLayer`` (sdpa and eager, GQA/MQA/MHA, with and
    without Llama-3 RoPE scaling, lengths 1, odd, and past the scaling's original context);
  * the ``Mamba2`` mixer vs HF's ``Mamba2Mixer`` on its pure-PyTorch path (forward in eval and train
    mode, n_groups 1 and 2, lengths not divisible by the chunk, different chunk sizes on each side,
    and gradients of the input and every parameter);
  * whole models exported with ``to_hf_model`` (as Llama and Mamba2): equal logits, tied and untied.
"""

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig, Mamba2Config  # noqa: E402
from transformers.masking_utils import create_causal_mask  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding  # noqa: E402
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer  # noqa: E402

import strata  # noqa: E402
from strata.config import validate_config  # noqa: E402
from strata.interop import llama, mamba2  # noqa: E402
from strata.interop.pretrained import to_hf_model  # noqa: E402
from strata.models.lm import Block  # noqa: E402
from strata.nn.mamba2 import Mamba2  # noqa: E402
from strata.nn.rope import rope_frequencies  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
TOL = dict(atol=1e-5, rtol=1e-5)
# Gradients sum many more products than forwards (and parameter grads reach O(10) here), so they get
# 1e-4: the observed differences are ~1e-5 at worst, still far below any real mismatch.
GRAD_TOL = dict(atol=1e-4, rtol=1e-4)

# Llama-3 scaling with a small original context, so that at length 97 > 64 every regime is used:
# with head_dim 16 and theta 1e4 the wavelengths are 6.3 (kept), 20 and 63 (blended), 199+ (divided).
LLAMA3 = "model.attention.rope.scaling={factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_context: 64}"


# ---------------------------------------------------------------------------------------------
# Attention block vs LlamaDecoderLayer


def attention_config(*overrides, n_heads=4, n_kv_heads=2):
    return strata.load_config(
        CONFIGS / "transformer.yaml",
        overrides=[
            "model.d_model=64",
            "model.ffn.d_ffn=96",
            f"model.attention.n_heads={n_heads}",
            f"model.attention.n_kv_heads={n_kv_heads}",
            *overrides,
        ],
    ).model


def hf_llama_config(config):
    return LlamaConfig(**llama.config_to_hf(config))


def hf_mamba2_config(config):
    return Mamba2Config(**mamba2.config_to_hf(config))


def llama_layer_state_dict(block, config):
    """One strata ``A`` block's weights under ``LlamaDecoderLayer`` names: the block as the only
    layer of a one-layer model, through the Llama family's export."""
    state = {f"blocks.0.{name}": tensor for name, tensor in block.state_dict().items()}
    state |= dict.fromkeys(("embed.weight", "norm.weight", "head.weight"))  # not part of a layer
    exported = llama.weights_to_hf(config.model_copy(update={"layout": "A"}), state)
    return {name.removeprefix("model.layers.0."): tensor for name, tensor in exported.items()
            if name.startswith("model.layers.0.")}


def random_block(config, seed=0):
    """A strata ``A`` block with weights large enough that attention is far from uniform and the
    norm weights are not all ones (so a mis-copied norm would show)."""
    torch.manual_seed(seed)
    block = Block("A", config)
    with torch.no_grad():
        for name, param in block.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.normal_(std=0.15)
    return block


def llama_layer_from(block, config, implementation):
    hf_config = hf_llama_config(config)
    hf_config._attn_implementation = implementation
    layer = LlamaDecoderLayer(hf_config, layer_idx=0)
    state = llama_layer_state_dict(block, config)
    layer.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return layer.eval(), hf_config


def run_llama_layer(layer, hf_config, x):
    """The layer as LlamaModel calls it: RoPE tables from LlamaRotaryEmbedding and the mask that
    ``create_causal_mask`` builds for the configured implementation (None for sdpa, which then
    relies on ``is_causal``; an additive [B, 1, T, T] mask for eager)."""
    positions = torch.arange(x.shape[1])[None]
    position_embeddings = LlamaRotaryEmbedding(hf_config)(x, positions)
    mask = create_causal_mask(
        config=hf_config, inputs_embeds=x, attention_mask=None, past_key_values=None, position_ids=positions
    )
    return layer(x, attention_mask=mask, position_ids=positions, position_embeddings=position_embeddings)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("scaled", [False, True], ids=["rope", "llama3-rope"])
@pytest.mark.parametrize("length", [1, 37, 97])
def test_attention_block_equals_llama_decoder_layer(implementation, scaled, length):
    config = attention_config(*([LLAMA3] if scaled else []))
    block = random_block(config).eval()
    layer, hf_config = llama_layer_from(block, config, implementation)
    x = torch.randn(2, length, config.d_model, generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ours, theirs = block(x), run_llama_layer(layer, hf_config, x)
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "n_heads,n_kv_heads,head_dim",
    [(4, 1, None), (4, 4, None), (2, 1, 24)],
    ids=["mqa", "mha", "gqa-explicit-head-dim"],
)
def test_attention_block_head_layouts(implementation, n_heads, n_kv_heads, head_dim):
    """MQA, plain MHA, and a head_dim that is not d_model / n_heads (Q width 48 != d_model 64)."""
    extra = [f"model.attention.head_dim={head_dim}"] if head_dim else []
    config = attention_config(*extra, n_heads=n_heads, n_kv_heads=n_kv_heads)
    block = random_block(config, seed=1).eval()
    layer, hf_config = llama_layer_from(block, config, implementation)
    x = torch.randn(3, 29, config.d_model, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(block(x), run_llama_layer(layer, hf_config, x), **TOL)


def test_llama3_rope_frequencies_match_hf_and_matter():
    """The scaled inverse frequencies are HF's, and scaling changes the block's output at length 97
    (so the scaled comparison above is not secretly comparing unscaled RoPE)."""
    plain, scaled = attention_config(), attention_config(LLAMA3)
    for config in (plain, scaled):
        hf_inv_freq = LlamaRotaryEmbedding(hf_llama_config(config)).inv_freq
        ours = rope_frequencies(config.attention.head_dim, config.attention.rope)
        torch.testing.assert_close(ours, hf_inv_freq, atol=1e-7, rtol=1e-6)
    ratio = rope_frequencies(16, scaled.attention.rope) / rope_frequencies(16, plain.attention.rope)
    assert ratio[0] == 1.0 and ratio[-1] == pytest.approx(1 / 8)  # kept / divided by factor
    assert ((ratio > 1 / 8 + 1e-3) & (ratio < 1 - 1e-3)).any()  # some blended
    block_plain, block_scaled = random_block(plain).eval(), random_block(scaled).eval()
    block_scaled.load_state_dict(block_plain.state_dict())
    x = torch.randn(1, 97, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (block_plain(x) - block_scaled(x)).abs().max() > 1e-2


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_reference_llama_layer_is_causal_with_the_mask_we_pass(implementation):
    """Guard for the comparison itself: the HF layer, called as above, is causal. (With eager,
    ``attention_mask=None`` would mean *no* mask, i.e. bidirectional attention; sdpa turns None into
    ``is_causal=True``.) Perturbing x at t leaves outputs before t unchanged and changes those after."""
    config = attention_config()
    layer, hf_config = llama_layer_from(random_block(config), config, implementation)
    x = torch.randn(1, 20, config.d_model, generator=torch.Generator().manual_seed(3))
    y = x.clone()
    y[:, 10] += 1.0
    with torch.no_grad():
        diff = (run_llama_layer(layer, hf_config, x) - run_llama_layer(layer, hf_config, y)).abs().amax(-1)[0]
        assert diff[:10].max() <= 1e-6  # exactly 0 in practice
        assert diff[11:].min() > 1e-4
    if implementation == "eager":
        rope = LlamaRotaryEmbedding(hf_config)(x, torch.arange(20)[None])
        with torch.no_grad():
            unmasked_x = layer(x, attention_mask=None, position_embeddings=rope)
            unmasked_y = layer(y, attention_mask=None, position_embeddings=rope)
        assert (unmasked_x - unmasked_y)[:, :10].abs().max() > 1e-4, "eager without a mask should be bidirectional"


# ---------------------------------------------------------------------------------------------
# Mamba2 mixer vs HF Mamba2Mixer (torch fallback path: no mamba_ssm / causal_conv1d on CPU)


def mamba_config(n_groups=1, chunk_size=8):
    return validate_config(
        {
            "model": {
                "vocab_size": 64,
                "d_model": 32,
                "layout": "M",
                "mamba": {"d_ssm": 64, "d_state": 16, "head_dim": 16, "n_groups": n_groups, "chunk_size": chunk_size},
                "ffn": {"kind": "none"},
            }
        }
    ).model


def random_mixer(config, seed=0):
    """A strata Mamba2 mixer with every parameter randomised: dt ~ softplus(N(0,1)) so decays both
    carry state across several chunks and damp it within one; norm weight and D away from 1."""
    torch.manual_seed(seed)
    mixer = Mamba2(config.d_model, config.mamba, config.norm_eps)
    with torch.no_grad():
        for name, param in mixer.named_parameters():
            if name == "A_log":
                param.copy_(torch.empty_like(param).uniform_(0.01, 2.0).log())
            elif name in ("dt_bias", "D"):
                param.normal_()
            elif name == "norm.weight":
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.normal_(std=0.2)
    return mixer


def hf_mixer_from(mixer, config, chunk_size):
    hf_config = hf_mamba2_config(config)
    hf_config.chunk_size = chunk_size
    hf_mixer = Mamba2Mixer(hf_config, layer_idx=0)
    hf_mixer.load_state_dict(mixer.state_dict(), strict=True)  # identical names and shapes
    assert hf_mixer.chunk_size == chunk_size
    return hf_mixer


@pytest.mark.parametrize("n_groups", [1, 2])
@pytest.mark.parametrize("length", [1, 7, 37])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("ours_chunk,hf_chunk", [(8, 16), (16, 5)])
def test_mamba2_mixer_equals_hf(n_groups, length, training, ours_chunk, hf_chunk):
    config = mamba_config(n_groups, ours_chunk)
    mixer = random_mixer(config, seed=n_groups)
    hf_mixer = hf_mixer_from(mixer, config, hf_chunk)
    mixer.train(training)
    hf_mixer.train(training)
    x = torch.randn(2, length, config.d_model, generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), hf_mixer(x), **TOL)


def test_mamba2_mixer_output_does_not_depend_on_chunk_size():
    config = mamba_config(n_groups=2, chunk_size=64)
    reference_mixer = random_mixer(config, seed=5).eval()
    x = torch.randn(2, 45, config.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = reference_mixer(x)
        for chunk in (1, 3, 8, 45, 100):
            mixer = Mamba2(config.d_model, mamba_config(2, chunk).mamba, config.norm_eps)
            mixer.load_state_dict(reference_mixer.state_dict())
            torch.testing.assert_close(mixer.eval()(x), reference, **TOL)


@pytest.mark.parametrize("n_groups", [1, 2])
@pytest.mark.parametrize("length", [7, 37])
def test_mamba2_mixer_gradients_equal_hf(n_groups, length):
    config = mamba_config(n_groups, chunk_size=8)
    mixer = random_mixer(config, seed=10 + n_groups).train()
    hf_mixer = hf_mixer_from(mixer, config, chunk_size=16).train()
    generator = torch.Generator().manual_seed(length)
    x = torch.randn(2, length, config.d_model, generator=generator)
    probe = torch.randn(2, length, config.d_model, generator=generator)  # random projection of the outputs

    def gradients(module):
        names = sorted(name for name, _ in module.named_parameters())
        params = dict(module.named_parameters())
        inp = x.clone().requires_grad_(True)
        (module(inp) * probe).sum().backward()
        out = {"input": inp.grad}
        out.update({name: params[name].grad for name in names})
        return out

    ours, theirs = gradients(mixer), gradients(hf_mixer)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name] is not None and theirs[name] is not None, name
        torch.testing.assert_close(ours[name], theirs[name], **GRAD_TOL, msg=lambda m, name=name: f"d/d{name}: {m}")


# ---------------------------------------------------------------------------------------------
# Whole models through strata.interop.hf


def random_tokens(vocab, batch, length, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("scaled", [False, True], ids=["rope", "llama3-rope"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_llama_export_same_logits(tie, scaled, implementation):
    overrides = [f"model.tie_embeddings={str(tie).lower()}", "model.init_std=0.05"]
    if scaled:
        overrides.append(LLAMA3.replace("original_context: 64", "original_context: 32"))
    config = strata.load_config(CONFIGS / "transformer.yaml", overrides=overrides).model
    torch.manual_seed(0)
    model = strata.build_model(config).eval()
    hf_model = to_hf_model(model)
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    assert hf_model.config._attn_implementation == "sdpa"
    if implementation != "sdpa":
        hf_model.set_attn_implementation(implementation)
        assert hf_model.config._attn_implementation == implementation
    assert (hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()) == tie
    tokens = random_tokens(config.vocab_size, 2, 45)
    with torch.no_grad():
        ours, theirs = model(tokens), hf_model(tokens).logits
    assert ours.abs().max() > 0.1  # not a degenerate near-zero comparison
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_mamba2_export_same_logits(tie):
    config = strata.load_config(
        CONFIGS / "mamba2.yaml",
        overrides=[
            f"model.tie_embeddings={str(tie).lower()}",
            "model.ffn={kind: none}",
            "model.mamba.chunk_size=16",  # 45 tokens: two full chunks and a partial one
            "model.mamba.n_groups=2",
            "model.init_std=0.05",
        ],
    ).model
    torch.manual_seed(0)
    model = strata.build_model(config).eval()
    hf_model = to_hf_model(model)
    assert type(hf_model).__name__ == "Mamba2ForCausalLM"
    assert (hf_model.lm_head.weight.data_ptr() == hf_model.backbone.embeddings.weight.data_ptr()) == tie
    tokens = random_tokens(config.vocab_size, 2, 45, seed=1)
    with torch.no_grad():
        ours, theirs = model(tokens), hf_model(tokens).logits
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, **TOL)

"""Shared checks of the Hugging Face family tests: a tiny random HF model saved to disk, loaded
by ``strata.from_pretrained``, gives HF's logits and greedy tokens; an exported strata model
loads back in transformers with the same logits."""

from __future__ import annotations

from pathlib import Path

import torch

import strata
from strata.interop.pretrained import save_hf
from strata.train.runs import TrainedModel, from_pretrained

LOGIT_TOL = dict(atol=1e-4, rtol=1e-4)
BATCH, LENGTH, GREEDY = 2, 64, 32


def randomized(hf_model, seed: int = 0, std: float = 0.08):
    """Every floating parameter of ``hf_model`` redrawn, so that norms, biases, A_log, D and dt_bias
    are not at their initial constants (a mis-mapped one would then go unseen)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("norm.weight", "norm_f.weight")):
                param.copy_(1 + 0.2 * noise)
            elif name.endswith("A_log"):
                param.copy_(torch.rand(param.shape, generator=generator).mul(2).add(0.01).log())
            elif name.endswith(("dt_bias", ".D")):
                param.copy_(noise * 0.5)
            else:
                param.copy_(noise * std)
    return hf_model.eval()


# Qwen's zero-centred RMSNorms (Qwen3-Next, Qwen3.5), which apply 1 + w: their weights' names end so.
QWEN_ZERO_CENTRED = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight", "k_norm.weight",
                     "model.norm.weight", "language_model.norm.weight")


def qwen_norms_near_zero(hf_model):
    """``hf_model``'s zero-centred norms near 0, as trained ones are: a norm imported without its + 1
    would scale by ~0."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if name.endswith(QWEN_ZERO_CENTRED):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return hf_model


def saved(hf_model, directory: Path) -> Path:
    hf_model.save_pretrained(str(directory))
    return directory


def tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, LENGTH), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(ours: torch.nn.Module, hf_model, vocab: int) -> None:
    x = tokens(vocab)
    with torch.no_grad():
        mine, theirs = ours(x), hf_model(x).logits
    assert mine.abs().max() > 0.1, "degenerate comparison: the logits are all near zero"
    torch.testing.assert_close(mine, theirs, **LOGIT_TOL)


def assert_same_greedy(ours: torch.nn.Module, hf_model, vocab: int) -> None:
    """32 greedy tokens from a 16-token prompt (batch of one: HF pads nothing then)."""
    prompt = tokens(vocab, seed=1)[:1, :16]
    with torch.no_grad():
        # (An explicit mask: without one, generate takes prompt tokens equal to pad_token_id for padding.)
        theirs = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GREEDY,
                                   min_new_tokens=GREEDY, do_sample=False, pad_token_id=0, eos_token_id=None)[0, 16:]
        mine = strata.generate(ours, [prompt[0].tolist()], max_new_tokens=GREEDY, temperature=0.0)[0].tokens
    assert mine == theirs.tolist()


def assert_imports(hf_model, directory: Path, layout: str | None = None) -> TrainedModel:
    """Save ``hf_model``, load it with strata, compare logits and greedy tokens."""
    loaded = from_pretrained(saved(hf_model, directory))
    if layout is not None:
        assert loaded.config.model.layout == layout
    assert_same_logits(loaded.model, hf_model, loaded.config.model.vocab_size)
    assert_same_greedy(loaded.model, hf_model, loaded.config.model.vocab_size)
    return loaded


def assert_exports(config, directory: Path, architecture: str, seed: int = 0):
    """A strata model of ``config`` exported and read back by AutoModelForCausalLM: same logits."""
    from transformers import AutoModelForCausalLM

    # Every weight redrawn large enough that attention is far from uniform: with the default
    # initialisation q·k is near zero, and a wrong softmax scale would pass unseen.
    model = randomized(strata.build_model(config), seed, std=0.25)
    out = save_hf(model, None, directory / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(hf_model).__name__ == architecture
    assert_same_logits(model, hf_model, config.model.vocab_size)
    return model, hf_model

"""Bits per byte: exact values for uniform models, every text token scored once, batching-invariant."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from strata import build_model, load_config
from strata.data import BPETokenizer, ByteTokenizer, DataError, Document, corpus_path
from strata.inference.bpb import bits_per_byte

ROOT = Path(__file__).resolve().parents[1]

DOCUMENTS = [
    Document("a.txt", b"To be, or not to be, that is the question.\n" * 5),
    Document("b.txt", "Ünïcödé and emoji 🎉 mixed in\n".encode() * 3),
    Document("c.txt", b"x"),
]


class Uniform(nn.Module):
    """Equal logits over ``allowed`` ids, -inf elsewhere; records whether gradients were enabled."""

    def __init__(self, vocab_size: int, allowed: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.allowed = allowed
        self.grad_seen = []

    def forward(self, tokens):
        self.grad_seen.append(torch.is_grad_enabled())
        logits = torch.zeros(*tokens.shape, self.bias.numel())
        logits[..., self.allowed :] = float("-inf")
        return logits


class Bigram(nn.Module):
    """Next-token log-probabilities that depend on the current token only."""

    def __init__(self, vocab_size: int, seed: int = 0):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(seed)))

    def forward(self, tokens):
        return self.table[tokens]


def test_uniform_over_bytes_is_exactly_eight_bits_per_byte():
    model = Uniform(259, allowed=256)
    model.train()
    result = bits_per_byte(model, ByteTokenizer(), DOCUMENTS, seq_len=7, batch_size=3)
    total = sum(len(d.text) for d in DOCUMENTS)
    assert result["bpb"] == pytest.approx(8.0, abs=1e-6)
    assert (result["bytes"], result["tokens"]) == (total, total)
    assert result["nats"] == pytest.approx(total * math.log(256), rel=1e-6)
    assert [d["name"] for d in result["per_document"]] == ["a.txt", "b.txt", "c.txt"]
    assert all(d["bpb"] == pytest.approx(8.0, abs=1e-6) for d in result["per_document"])
    assert model.training and model.grad_seen and not any(model.grad_seen)  # mode restored, no autograd


def test_uniform_over_a_bpe_vocabulary():
    text = corpus_path("shakespeare").read_bytes()
    tokenizer = BPETokenizer.train([Document("slice", text[:200_000])], 512)
    documents = [Document("held-out", text[-20_000:]), *DOCUMENTS]
    model = Uniform(tokenizer.vocab_size, allowed=tokenizer.vocab_size).eval()
    result = bits_per_byte(model, tokenizer, documents, seq_len=64, batch_size=4)
    tokens = sum(len(tokenizer.encode(d.text)) for d in documents)
    assert result["tokens"] == tokens < result["bytes"]
    assert result["bpb"] == pytest.approx(math.log2(512) * tokens / result["bytes"], abs=1e-6)
    assert not model.training


def bigram_nats(model, tokenizer, documents):
    """Reference: -log p over every (previous, next) pair of [BOS] + text, in one pass."""
    log_probs = model.table.detach().double().log_softmax(-1).numpy()
    total = 0.0
    for document in documents:
        tokens = np.concatenate([[tokenizer.bos_id], tokenizer.encode(document.text)])
        total -= log_probs[tokens[:-1], tokens[1:]].sum()
    return total


@pytest.mark.parametrize("seq_len, batch_size", [(1, 1), (5, 2), (16, 8), (1000, 3)])
def test_every_text_token_is_scored_once_whatever_the_windows(seq_len, batch_size):
    """A bigram model needs only the previous token, which each window's first input supplies; so
    any windowing must give the one-pass total, and any missed or repeated target would show."""
    model, tokenizer = Bigram(259), ByteTokenizer()
    result = bits_per_byte(model, tokenizer, DOCUMENTS, seq_len=seq_len, batch_size=batch_size)
    assert result["nats"] == pytest.approx(bigram_nats(model, tokenizer, DOCUMENTS), rel=1e-6)


def test_padding_never_leaks_into_a_real_model():
    """Windows of different lengths share a padded batch; a causal model must score them as alone."""
    torch.manual_seed(0)
    model = build_model(load_config(ROOT / "configs" / "tiny" / "inter.yaml"))
    one = bits_per_byte(model, ByteTokenizer(), DOCUMENTS, seq_len=48, batch_size=1)
    many = bits_per_byte(model, ByteTokenizer(), DOCUMENTS, seq_len=48, batch_size=8)
    assert many["bpb"] == pytest.approx(one["bpb"], rel=1e-5)
    assert 7.5 < one["bpb"] < 8.5  # untrained: near log2(259) bits per byte


def test_nothing_to_score_is_an_error():
    with pytest.raises(DataError, match="nothing to evaluate"):
        bits_per_byte(Uniform(259, 256), ByteTokenizer(), [Document("empty", b"")], seq_len=8)

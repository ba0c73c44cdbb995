"""Loss by position, the paper's protocol: one row per document, from its start; buckets of 1,024
tokens; nats per token beside bits per byte, checked against values worked out by hand."""

import numpy as np
import pytest
import torch
from torch import nn

from strata.data import DataError, Document
from strata.evals.long_context import _buckets, loss_by_position, loss_by_position_markdown


class PairTokenizer:
    """Two bytes a token: ids 0-15 are "00" to "15"; 16, 17, 18 are BOS, EOS, PAD. Bits per byte is
    then half of bits per token, which a byte tokenizer would not tell apart."""

    kind = "pairs"
    vocab_size = 19
    bos_id, eos_id, pad_id = 16, 17, 18

    def encode(self, data: bytes) -> np.ndarray:
        return np.array([int(data[i : i + 2]) for i in range(0, len(data), 2)], dtype=np.int32)

    def decode(self, ids) -> bytes:
        return b"".join(b"%02d" % token for token in ids if token < 16)


class Narrowing(nn.Module):
    """Equal odds on ids 0-15 at positions 0-1023 and on ids 0-3 from position 1024 on."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # the device

    def forward(self, tokens):
        logits = torch.full((*tokens.shape, PairTokenizer.vocab_size), float("-inf"))
        logits[:, :1024, :16] = 0.0
        logits[:, 1024:, :4] = 0.0
        return logits


def document(name: str, tokens: int, tail: int = 0) -> Document:
    """``tokens`` tokens among ids 0-3, then ``tail`` tokens of id 15, which Narrowing rules out
    past position 1024: were any of them read, the loss would be infinite."""
    return Document(name, (b"00010203" * tokens)[: 2 * tokens] + b"15" * tail)


def test_paper_buckets_are_1024_tokens():
    assert _buckets(4096, "paper") == [(0, 1024), (1024, 2048), (2048, 3072), (3072, 4096)]
    assert _buckets(2560, "paper") == [(0, 1024), (1024, 2048), (2048, 2560)]
    assert _buckets(192, "paper") == [(0, 192)]


def test_paper_protocol_reads_each_document_once_from_its_start():
    """Hand-computed: positions 0-1023 cost ln 16 = 2.7726 nats a token, 4 bits over 2 bytes = 2
    bits per byte; positions from 1024 on ln 4 = 1.3863 nats, 1 bit per byte. Over a window of
    2,560: (1024 * 4 + 1536 * 2) / 2560 = 2.8 bits a token, 1.4 bits per byte."""
    documents = [document("long", 3000), document("longer", 2560, tail=3440), document("short", 500)]
    result = loss_by_position(Narrowing(), PairTokenizer(), documents, length=2560, batch_size=2, protocol="paper")
    assert (result["protocol"], result["documents"], result["windows"]) == ("paper", 3, 2)
    assert [(b["start"], b["end"], b["tokens"]) for b in result["buckets"]] == [(0, 1024, 2048), (1024, 2048, 2048),
                                                                                 (2048, 2560, 1024)]
    assert [b["nats_per_token"] for b in result["buckets"]] == pytest.approx([2.772588722239781, 1.3862943611198906,
                                                                              1.3862943611198906])
    assert [b["bpb"] for b in result["buckets"]] == pytest.approx([2.0, 1.0, 1.0])
    assert result["nats_per_token"] == pytest.approx(1.9408121055678468)  # 2.8 ln 2
    assert result["bpb"] == pytest.approx(1.4)
    table = loss_by_position_markdown(result)
    assert "| 0-1023 | 2.0000 | 2.7726 | 2,048 |" in table and "| 2048-2559 | 1.0000 | 1.3863 | 1,024 |" in table
    assert table.startswith("2 windows of 2,560 tokens from 3 documents, paper protocol.")


def test_strata_protocol_reads_every_window_and_the_paper_none_of_a_short_document():
    documents = [document("long", 3000), document("longer", 6000)]
    result = loss_by_position(Narrowing(), PairTokenizer(), documents, length=2560)
    assert result["windows"] == 1 + 2 and [b["start"] for b in result["buckets"]][:3] == [0, 16, 32]
    with pytest.raises(DataError, match="no document has 2,560 tokens for one window"):
        loss_by_position(Narrowing(), PairTokenizer(), [document("short", 500)], length=2560, protocol="paper")
    with pytest.raises(ValueError, match="unknown loss-by-position protocol 'pg19'; choose strata or paper"):
        loss_by_position(Narrowing(), PairTokenizer(), documents, length=2560, protocol="pg19")

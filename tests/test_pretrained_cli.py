"""Every command that takes a run takes a Hugging Face model directory too: a tiny random Bamba
saved with a tokenizer.json is generated from, evaluated, described, fine-tuned and converted
through the real ``strata`` command."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from transformers import BambaForCausalLM  # noqa: E402

from cli_runner import ROOT, strata  # noqa: E402
from hf_families import randomized  # noqa: E402
from strata import from_pretrained  # noqa: E402
from strata.data import corpus_path  # noqa: E402
from test_hf_bamba import bamba_config  # noqa: E402
from tokenizer_files import BOS, EOS, llama_like, save_with_config  # noqa: E402

VOCAB = 300


@pytest.fixture(scope="module")
def bamba_dir(tmp_path_factory):
    """A tiny Bamba with a Llama-3 style tokenizer of VOCAB ids trained on Shakespeare."""
    folder = tmp_path_factory.mktemp("bamba")
    text = corpus_path("shakespeare").read_text()[:200_000]
    tokenizer = llama_like(text, vocab_size=VOCAB)
    save_with_config(tokenizer, folder, bos_token=BOS, eos_token=EOS)
    randomized(BambaForCausalLM(bamba_config(vocab_size=VOCAB))).save_pretrained(str(folder))
    return folder


def test_generate_reads_a_hugging_face_directory(bamba_dir):
    result = strata("generate", bamba_dir, "--prompt", "ROMEO:", "--max-new", 8, "--temperature", 0)
    assert result.stdout.decode().startswith("ROMEO:")


def test_eval_reads_a_hugging_face_directory(bamba_dir, tmp_path):
    text = tmp_path / "held-out.txt"
    text.write_text(corpus_path("shakespeare").read_text()[-20_000:])
    scores = json.loads(strata("eval", bamba_dir, "--data", text, "--json").stdout)
    assert scores["bpb"] > 0


def test_info_prints_the_imported_layout(bamba_dir):
    output = strata("info", bamba_dir).stdout.decode()
    assert "MAMA" in output and "BambaForCausalLM" in output
    cost = json.loads(strata("info", bamba_dir, "--json").stdout)
    loaded = from_pretrained(bamba_dir)
    assert cost["params"] == sum(p.numel() for p in loaded.model.parameters())


def test_train_init_from_fine_tunes_the_directory(bamba_dir, tmp_path):
    out = tmp_path / "run"
    strata("train", ROOT / "configs/tiny/transformer.yaml", "--init-from", bamba_dir, "--steps", 5, "--data",
           "shakespeare", "--out", out, "--quiet", "train.seq_len=64", "train.batch_size=2", "train.eval_bytes=2048",
           "data.valid_fraction=0.01", "train.save_every=5")
    config = from_pretrained(out).config
    assert config.model.layout == "MAMA" and config.train.init_from == str(bamba_dir)
    tuned, start = from_pretrained(out).model, from_pretrained(bamba_dir).model
    moved = [name for name, param in tuned.state_dict().items() if not torch.equal(param, start.state_dict()[name])]
    assert moved, "five optimiser steps changed no weight"


def test_convert_round_trips_through_strata_and_hf(bamba_dir, tmp_path):
    strata("convert", bamba_dir, "--to", "strata", "--out", tmp_path / "run")
    strata("convert", tmp_path / "run", "--to", "hf", "--out", tmp_path / "hf")
    original, back = from_pretrained(bamba_dir), from_pretrained(tmp_path / "hf")
    assert back.family == "BambaForCausalLM"
    x = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back.model(x), original.model(x), atol=1e-6, rtol=1e-6)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    result = strata("generate", tmp_path / "run", "--prompt", "To be", "--max-new", 4, "--temperature", 0)
    assert result.stdout.decode().startswith("To be")

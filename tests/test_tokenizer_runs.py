"""Tokenizers in real runs, through the CLI: a Hugging Face tokenizer file trains a model and is kept
in the run directory; a config whose model.vocab_size disagrees with its tokenizer stops before
training with one line naming both numbers, and trains once model.vocab_size is overridden."""

import json

import pytest
import yaml
from cli_runner import strata
from tokenizer_files import BOS, EOS, llama_like, save_with_transformers
from tokenizers import Tokenizer as LibraryTokenizer

from strata.data import HFTokenizer, corpus_path, load_tokenizer

# A model small enough that a run is mostly start-up: 2 blocks of width 32, 32-token windows.
TINY = {
    "model": {"vocab_size": 259, "d_model": 32, "layout": "AA", "context_length": 32,
              "attention": {"n_heads": 2, "n_kv_heads": 1, "rope": {"theta": 10000.0}},
              "ffn": {"kind": "swiglu", "d_ffn": 64}},
    "data": {"valid_fraction": 0.02},
    "train": {"steps": 3, "batch_size": 2, "eval_every": 1000, "save_every": 1000, "eval_bytes": 2048},
}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """200 KB of Shakespeare as the training data, and the 20 KB after it held out."""
    data = corpus_path("shakespeare").read_bytes()
    folder = tmp_path_factory.mktemp("text")
    (folder / "train.txt").write_bytes(data[:200_000])
    (folder / "held_out.txt").write_bytes(data[200_000:220_000])
    return folder


def write_config(path, **model):
    config = json.loads(json.dumps(TINY))
    config["model"].update(model)
    path.write_text(yaml.safe_dump(config))
    return path


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.decode().splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr.decode()
    return lines[0]


def test_a_vocab_size_the_tokenizer_disagrees_with_stops_unless_overridden(tmp_path, text):
    preset = write_config(tmp_path / "llama-vocab.yaml", vocab_size=128256)  # the Llama-3 size, on bytes
    result = strata("train", preset, "--data", text / "train.txt", "--out", tmp_path / "refused", "--quiet", check=False)
    line = one_line_error(result)
    assert "128256" in line and "259" in line and "bytes tokenizer" in line and "model.vocab_size=259" in line
    assert not (tmp_path / "refused" / "checkpoints").exists()

    strata("train", preset, "--data", text / "train.txt", "--out", tmp_path / "run", "--quiet", "model.vocab_size=259")
    assert (tmp_path / "run" / "checkpoints" / "step-000003").is_dir()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["vocab_size"] == 259


def test_an_hf_tokenizer_folder_trains_and_stays_with_the_run(tmp_path, text):
    library = llama_like((text / "train.txt").read_text(), 800)
    library.save(str(tmp_path / "trained.json"))
    fast = save_with_transformers(tmp_path / "trained.json", tmp_path / "hf")  # a model folder's tokenizer
    size = len(fast)
    config = write_config(tmp_path / "config.yaml")
    common = [config, "--data", text / "train.txt", "--quiet", f"data.tokenizer={{kind: hf, path: {tmp_path / 'hf'}}}"]

    line = one_line_error(strata("train", *common, "--out", tmp_path / "refused", check=False))
    assert "259" in line and str(size) in line and "hf tokenizer" in line and str(tmp_path / "hf") in line

    run = tmp_path / "run"
    strata("train", *common, "--out", run, f"model.vocab_size={size}")
    assert (run / "checkpoints" / "step-000003").is_dir()
    # The run keeps the file itself, so it no longer needs the folder it came from.
    assert (run / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()
    (tmp_path / "hf" / "tokenizer.json").unlink()
    tokenizer = load_tokenizer(run)
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.vocab_size == size
    assert (tokenizer.bos_id, tokenizer.eos_id) == (fast.bos_token_id, fast.eos_token_id)
    assert fast.convert_ids_to_tokens([tokenizer.bos_id, tokenizer.eos_id]) == [BOS, EOS]

    held_out = (text / "held_out.txt").read_text()
    reference = LibraryTokenizer.from_file(str(run / "tokenizer.json"))
    ids = reference.encode(held_out, add_special_tokens=False).ids
    assert tokenizer.encode(held_out.encode()).tolist() == ids
    assert tokenizer.decode(ids) == reference.decode(ids).encode() == held_out.encode()

    # Evaluation reads the run's tokenizer and counts the held-out file's own bytes.
    score = json.loads(strata("eval", run, "--data", text / "held_out.txt", "--json").stdout)
    assert score["bytes"] == len(held_out.encode()) and 0 < score["bpb"] < 16


def test_a_sweep_whose_run_disagrees_with_its_tokenizer_stops_when_planned(tmp_path):
    """The sweep planner checks what the trainer checks, before the first run trains."""
    write_config(tmp_path / "tiny.yaml")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: {config: tiny.yaml}\n"
                     "grid: {tokenizer: {key: data.tokenizer, values: [bytes, bpe]}}\n")
    line = one_line_error(strata("sweep", sweep, "--dry-run", "data.bpe_vocab_size=512", check=False))
    assert "model.vocab_size: 259 disagrees with the bpe tokenizer (data.bpe_vocab_size=512), which has 512 ids" in line

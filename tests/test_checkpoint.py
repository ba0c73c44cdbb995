"""Checkpoints: atomic, keep-last-k, fall back past a corrupted newest one, refuse other architectures."""

import json
from pathlib import Path

import pytest
import torch

from strata import build_model, load_config
from strata.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_and_optimizer():
    torch.manual_seed(0)
    model = build_model(load_config(ROOT / "configs/tiny/inter.yaml"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 259, (2, 9))).sum().backward()
    optimizer.step()
    return model, optimizer


def test_save_and_load_round_trip(tmp_path, model_and_optimizer):
    model, optimizer = model_and_optimizer
    path = save_checkpoint(tmp_path, 7, model, optimizer, {"tokens": 123, "loader": {"epoch": 0}}, keep_last=3)
    assert path.name == "step-000007" and not list(path.parent.glob(".tmp-*"))
    checkpoint = load_checkpoint(path)
    assert checkpoint.step == 7 and checkpoint.state["tokens"] == 123
    fresh = build_model(load_config(ROOT / "configs/tiny/inter.yaml"))
    load_model_weights(fresh, checkpoint.model, path)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    restored = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    restored.load_state_dict(checkpoint.optimizer)
    assert restored.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


def test_keeps_only_the_last_k(tmp_path, model_and_optimizer):
    model, optimizer = model_and_optimizer
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model, optimizer, {"tokens": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000040", "step-000030"]


def test_an_interrupted_save_leaves_the_previous_checkpoint_newest(tmp_path, model_and_optimizer):
    model, optimizer = model_and_optimizer
    save_checkpoint(tmp_path, 10, model, optimizer, {"tokens": 10}, keep_last=3)
    (tmp_path / "checkpoints" / ".tmp-step-000020").mkdir()  # what a crash mid-save leaves
    (tmp_path / "checkpoints" / ".tmp-step-000020" / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).step == 10


@pytest.mark.parametrize("damage", ["truncate weights", "delete state", "garble optimizer"])
def test_a_corrupted_newest_checkpoint_falls_back_with_a_warning(tmp_path, model_and_optimizer, damage):
    model, optimizer = model_and_optimizer
    save_checkpoint(tmp_path, 10, model, optimizer, {"tokens": 10}, keep_last=3)
    newest = save_checkpoint(tmp_path, 20, model, optimizer, {"tokens": 20}, keep_last=3)
    if damage == "truncate weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "delete state":
        (newest / "state.json").unlink()
    else:
        (newest / "optimizer.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="step-000020.*falling back"):
        checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.step == 10


def test_weights_from_another_architecture_are_refused_with_the_reason(tmp_path, model_and_optimizer):
    model, optimizer = model_and_optimizer
    path = save_checkpoint(tmp_path, 1, model, optimizer, {"tokens": 1}, keep_last=1)
    other = build_model(load_config(ROOT / "configs/tiny/inter.yaml", ["model.d_model=64"]))
    with pytest.raises(CheckpointError, match="different architecture.*shape"):
        load_model_weights(other, load_checkpoint(path).model, path)
    mamba_only = build_model(load_config(ROOT / "configs/tiny/mamba2.yaml"))
    with pytest.raises(CheckpointError, match="different architecture"):
        load_model_weights(mamba_only, load_checkpoint(path).model, path)


def test_no_pickle_is_needed_to_load(tmp_path, model_and_optimizer):
    """Optimiser and RNG files load with weights_only=True; the state is plain JSON."""
    model, optimizer = model_and_optimizer
    path = save_checkpoint(tmp_path, 3, model, optimizer, {"tokens": 3}, keep_last=1)
    torch.load(path / "optimizer.pt", weights_only=True)
    torch.load(path / "rng.pt", weights_only=True)
    assert json.loads((path / "state.json").read_text())["step"] == 3

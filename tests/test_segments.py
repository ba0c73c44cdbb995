"""Packed documents: with ``segment_ids`` no position sees another document. A row of three
documents gives the logits (1e-5) and gradients (1e-4) of the three run alone, in every family;
the chunked SSD scan with resets equals the recurrence with its state reset, wherever the
boundaries fall against the chunks."""

from pathlib import Path

import pytest
import torch

import strata
from strata.nn.conv import causal_conv1d, causal_conv1d_reference
from strata.nn.ssd import ssd_chunked, ssd_recurrent
from test_ssd import random_inputs

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
LENGTHS = (100, 37, 90)  # the sliding-window family's window is 64 + 8 sinks: two documents exceed it
FAMILIES = ["transformer", "swa", "mamba2", "inter", "intra", "intra-moe"]


def segment_ids(lengths, batch=1):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].expand(batch, -1)


# --- the scan --------------------------------------------------------------------------------------


def boundaries(length, chunk):
    """Segment starts at, just before and just after chunk edges, and one inside a chunk."""
    starts = {chunk - 1, chunk, chunk + 1, 2 * chunk, chunk // 2 + 1, length - 3}
    return sorted(s for s in starts if 0 < s < length)


@pytest.mark.parametrize("chunk", [8, 16, 32, 64, 128, 256])
def test_chunked_scan_with_resets_equals_the_reset_recurrence(chunk):
    length = 2 * chunk + 5
    inputs = random_inputs(2, length, 4, 8, 2, 16, seed=chunk, requires_grad=True)
    resets = torch.zeros(2, length, dtype=torch.bool)
    resets[0, boundaries(length, chunk)] = True
    resets[1, [chunk, length - 1]] = True
    probe = torch.randn(2, length, 4, 8, generator=torch.Generator().manual_seed(1))
    state_probe = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(2))

    def run(scan, **kwargs):
        y, state = scan(**inputs, **kwargs)
        loss = (y * probe).sum() + (state * state_probe).sum()
        return (y, state), torch.autograd.grad(loss, list(inputs.values()))

    (y, state), grads = run(ssd_chunked, chunk_size=chunk, resets=resets)
    (y_ref, state_ref), grads_ref = run(ssd_recurrent, resets=resets)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, state_ref, atol=1e-5, rtol=1e-5)
    for name, ours, reference in zip(inputs, grads, grads_ref):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"d/d{name}: {m}")


def test_a_reset_forgets_everything_before_it():
    """After a reset the outputs are those of a fresh recurrence from a zero state."""
    inputs = random_inputs(1, 40, 2, 4, 1, 8, seed=3)
    resets = torch.zeros(1, 40, dtype=torch.bool)
    resets[0, 17] = True
    y, _ = ssd_chunked(chunk_size=8, resets=resets, **inputs)
    tail = {name: value[:, 17:] if name in ("x", "dt", "B", "C") else value for name, value in inputs.items()}
    tail["initial_state"] = torch.zeros_like(inputs["initial_state"])
    fresh, _ = ssd_recurrent(**tail)
    torch.testing.assert_close(y[:, 17:], fresh, atol=1e-5, rtol=1e-5)


def test_the_conv_does_not_read_across_a_boundary():
    x = torch.randn(2, 30, 6, requires_grad=True)
    weight, bias = torch.randn(6, 4), torch.randn(6)
    ids = segment_ids((11, 3, 16), batch=2)
    packed = causal_conv1d(x, weight, bias, segment_ids=ids)
    alone = torch.cat([causal_conv1d_reference(part, weight, bias) for part in x.split((11, 3, 16), dim=1)], 1)
    torch.testing.assert_close(packed, alone)


# --- whole models ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_equal_the_documents_alone(family):
    config = strata.load_config(TINY / f"{family}.yaml", overrides=["model.init_std=0.1"]).model
    torch.manual_seed(0)
    model = strata.build_model(config)
    tokens = torch.randint(0, config.vocab_size, (2, sum(LENGTHS)), generator=torch.Generator().manual_seed(1))
    probe = torch.randn(2, sum(LENGTHS), config.vocab_size, generator=torch.Generator().manual_seed(2))

    def gradients(loss):
        return torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)

    packed = model(tokens, segment_ids=segment_ids(LENGTHS, batch=2))
    packed_grads = gradients((packed * probe).sum())
    alone = [model(part) for part in tokens.split(LENGTHS, dim=1)]
    alone_grads = gradients(sum((logits * part).sum() for logits, part in zip(alone, probe.split(LENGTHS, dim=1))))
    torch.testing.assert_close(packed, torch.cat(alone, 1), atol=1e-5, rtol=1e-5)
    for (name, _), ours, reference in zip(model.named_parameters(), packed_grads, alone_grads):
        if reference is None:
            assert ours is None or not ours.any(), name
            continue
        assert_close_to_scale(ours, reference, name)


def assert_close_to_scale(ours, reference, name, tolerance=1e-4):
    """Equal within ``tolerance`` of the gradient's largest entry. The probe sums some 10^5 outputs,
    so gradients reach 10^2-10^3 and float32's summation order alone moves them by ~2e-6 of that
    (measured); a document that saw its neighbour would move them by far more."""
    scale = reference.abs().max().clamp(min=1e-12)
    error = (ours - reference).abs().max()
    assert error <= tolerance * scale, f"d/d{name}: off by {error:.3g}, {error / scale:.2g} of its scale {scale:.3g}"


@pytest.mark.parametrize("family", ["transformer", "mamba2"])
def test_one_segment_is_the_plain_forward(family):
    config = strata.load_config(TINY / f"{family}.yaml").model
    model = strata.build_model(config)
    tokens = torch.randint(0, config.vocab_size, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, segment_ids=torch.zeros(2, 50, dtype=torch.long)), model(tokens))


# --- training on packed rows -----------------------------------------------------------------------


def test_document_ids_start_at_each_bos():
    from strata.data import document_ids

    tokens = torch.tensor([[5, 6, 1, 7, 8, 1, 9], [1, 2, 3, 4, 1, 5, 6]])
    assert document_ids(tokens, bos_id=1).tolist() == [[0, 0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 2, 2, 2]]


def test_training_with_document_masking_runs_and_the_aunet_refuses_it(tmp_path):
    from cli_runner import strata as run_strata
    from strata.config import ConfigError

    run_strata("train", TINY / "inter.yaml", "--data", "shakespeare", "--steps", 2, "--out", tmp_path / "run", "--quiet",
               "model.context_length=64", "train.batch_size=2", "train.eval_bytes=2048", "data.valid_fraction=0.01",
               "data.document_masking=true")
    assert (tmp_path / "run" / "checkpoints").is_dir()
    with pytest.raises(ConfigError, match="data.document_masking"):
        strata.load_config(TINY / "aunet2.yaml", overrides=["data.document_masking=true"])

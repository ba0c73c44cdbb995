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
FAMILIES = ["transformer", "swa", "mamba2", "inter", "intra", "intra-moe", "gdn", "inter-gdn", "kda"]


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
    # Run alone, a document's steps fall elsewhere in the chunks, which rounds differently: up to
    # 1.7e-5 on logits of magnitude 5 (Gated DeltaNet's triangular solve, measured). That another
    # document does not reach it is checked next: rewriting the first document moves the others by
    # rounding alone (masked attention's blocked softmax: up to 8e-6), where a leak moves them by
    # far more (>= 5e-2, tests/test_causality.py).
    torch.testing.assert_close(packed, torch.cat(alone, 1), atol=3e-5, rtol=1e-5)
    changed = tokens.clone()
    changed[:, : LENGTHS[0]] = torch.randint(0, config.vocab_size, (2, LENGTHS[0]), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        others = model(changed, segment_ids=segment_ids(LENGTHS, batch=2))[:, LENGTHS[0] :]
    torch.testing.assert_close(others, packed[:, LENGTHS[0] :].detach(), atol=3e-5, rtol=0)
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


def test_training_with_document_masking_runs(tmp_path):
    from cli_runner import strata as run_strata

    for family in ("inter", "aunet2"):
        run_strata("train", TINY / f"{family}.yaml", "--data", "shakespeare", "--steps", 2, "--out", tmp_path / family,
                   "--quiet", "model.context_length=64", "train.batch_size=2", "train.eval_bytes=2048",
                   "data.valid_fraction=0.01", "data.document_masking=true")
        assert (tmp_path / family / "checkpoints").is_dir()


# --- carried state ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES + ["hybrid-family", "aunet2", "aunet3", "hnet2"])
def test_a_carried_state_continues_the_sequence(family):
    """model(x1, state=s) then model(x2, state=s) equals model(x1 ++ x2): logits and gradients
    (through the state into the first call's weights and activations). The cut falls inside a
    sliding window and a Mamba chunk; the second part is longer than the window."""
    config = strata.load_config(TINY / f"{family}.yaml", overrides=["model.init_std=0.1"]).model
    torch.manual_seed(0)
    model = strata.build_model(config)
    if family.startswith("aunet"):  # text, so that the split rule finds words
        text = (b"To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
                b"and arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them.")
        tokens = torch.tensor([[256, *text[:149]], [256, *text[-149:]]])
    else:
        tokens = torch.randint(0, config.vocab_size, (2, 150), generator=torch.Generator().manual_seed(1))
    probe = torch.randn(2, 150, config.vocab_size, generator=torch.Generator().manual_seed(2))
    parameters = list(model.parameters())

    whole = model(tokens)
    whole_grads = torch.autograd.grad((whole * probe).sum(), parameters, allow_unused=True)
    state = model.carried_state()
    parts = [model(part, state=state) for part in tokens.split([45, 1, 104], dim=1)]
    assert state.length == 150
    carried_grads = torch.autograd.grad(sum((logits * p).sum() for logits, p in zip(parts, probe.split([45, 1, 104], 1))),
                                        parameters, allow_unused=True)
    # (3e-5: the parts fall elsewhere in the chunks and round differently, as packed documents do.)
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=3e-5, rtol=1e-5)
    for (name, _), ours, reference in zip(model.named_parameters(), carried_grads, whole_grads):
        if reference is not None:
            assert_close_to_scale(ours, reference, name)


def test_a_detached_state_keeps_values_and_drops_history():
    config = strata.load_config(TINY / "inter.yaml").model
    model = strata.build_model(config)
    tokens = torch.randint(0, config.vocab_size, (1, 40))
    state = model.carried_state()
    model(tokens[:, :20], state=state)
    state.detach()
    second = model(tokens[:, 20:], state=state)
    torch.testing.assert_close(second, model(tokens)[:, 20:], atol=1e-5, rtol=1e-5)
    second.sum().backward()  # reaches no graph of the first call (it would fail if it tried twice)


def test_max_context_bounds_the_keys_attention_carries():
    """With max_context 10 the second call sees the first call's last 10 tokens, as if the stream
    had started there (RoPE is relative). One block: deeper blocks' keys depend on all that came
    before through the blocks below."""
    config = strata.load_config(TINY / "transformer.yaml", overrides=["model.init_std=0.1", "model.layout=A"]).model
    model = strata.build_model(config)
    tokens = torch.randint(0, config.vocab_size, (2, 35))
    state = model.carried_state(max_context=10)
    with torch.no_grad():
        model(tokens[:, :30], state=state)
        assert all(layer.keys.shape[2] == 10 for layer in state.layers)
        torch.testing.assert_close(model(tokens[:, 30:], state=state), model(tokens[:, 20:])[:, 10:], atol=1e-5, rtol=1e-5)


# --- truncated backpropagation through time --------------------------------------------------------


@pytest.mark.parametrize("family", ["inter", "aunet2"])
def test_a_carried_state_run_resumes_exactly(tmp_path, family):
    """train.carry_state: a run killed after its step-6 checkpoint (here: stopped there) and resumed
    gives the straight run's losses bit for bit: the carried state (for an AU-Net also the split
    rule's, replayed) is part of the checkpoint."""
    from cli_runner import REPRODUCIBLE_BLAS
    from cli_runner import strata as run_strata
    from test_train import losses

    common = [TINY / f"{family}.yaml", "--data", "shakespeare", "--quiet", "model.context_length=32",
              "train.batch_size=2", "train.eval_bytes=2048", "data.valid_fraction=0.01", "train.schedule=constant",
              "train.eval_every=1000", "train.carry_state=true", "train.carry_context=16"]
    run_strata("train", *common, "--steps", 12, "--out", tmp_path / "straight", env=REPRODUCIBLE_BLAS)
    run_strata("train", *common, "--steps", 6, "--out", tmp_path / "stopped", env=REPRODUCIBLE_BLAS)
    assert (tmp_path / "stopped" / "checkpoints" / "step-000006" / "carried.safetensors").is_file()
    run_strata("train", "--resume", tmp_path / "stopped", "--quiet", "train.steps=12", env=REPRODUCIBLE_BLAS)
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")


def test_the_stream_loader_gives_each_row_consecutive_windows():
    import numpy as np

    from strata.data import StreamLoader

    loader = StreamLoader(np.arange(101), seq_len=10, batch_size=2)  # lanes of 50 tokens: 5 windows each
    first, second = loader.next_batch().tokens, loader.next_batch().tokens
    assert first[:, 0].tolist() == [0, 50] and second[:, 0].tolist() == [10, 60]
    assert torch.equal(first[:, -1], second[:, 0])  # a window's last token is the next one's first input
    for _ in range(3):
        loader.next_batch()
    assert loader.starts_lanes and loader.epoch == 1


@pytest.mark.parametrize("family", ["aunet2", "aunet3", "hnet2"])
def test_packed_documents_equal_the_documents_alone_in_an_aunet(family):
    """Three texts with the levels the split rule gives each alone: packed with segment_ids they
    give the logits and gradients of the three run alone. No BOS leads them, so only segment_ids
    make each document's first byte a split at every stage (as a sequence's first byte is)."""
    from strata.data import ByteTokenizer

    config = strata.load_config(TINY / f"{family}.yaml", overrides=["model.init_std=0.1"]).model
    torch.manual_seed(0)
    model = strata.build_model(config)
    tokenizer = ByteTokenizer()
    texts = [b"To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
             b"Now is the winter of our discontent",
             b"Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him."]
    docs = [torch.tensor([tokenizer.encode(text).tolist()]) for text in texts]
    levels = [model.split_levels(doc) for doc in docs]
    lengths = [doc.shape[1] for doc in docs]
    probe = torch.randn(1, sum(lengths), config.vocab_size, generator=torch.Generator().manual_seed(2))
    parameters = list(model.parameters())

    packed = model(torch.cat(docs, 1), levels=torch.cat(levels, 1), segment_ids=segment_ids(lengths))
    packed_grads = torch.autograd.grad((packed * probe).sum(), parameters, allow_unused=True)
    alone = [model(doc, levels=level) for doc, level in zip(docs, levels)]
    alone_grads = torch.autograd.grad(sum((logits * p).sum() for logits, p in zip(alone, probe.split(lengths, 1))),
                                      parameters, allow_unused=True)
    torch.testing.assert_close(packed, torch.cat(alone, 1), atol=1e-5, rtol=1e-5)
    for (name, _), ours, reference in zip(model.named_parameters(), packed_grads, alone_grads):
        if reference is not None:
            assert_close_to_scale(ours, reference, name)


def test_segment_ids_pass_through_activation_checkpointing():
    """train.activation_checkpointing (and compile) replace each block's training forward; packed
    documents must reach the mixers through it."""
    from strata.train.distributed import _wrap_training_forward

    config = strata.load_config(TINY / "inter.yaml").model
    model = strata.build_model(config)
    tokens = torch.randint(0, config.vocab_size, (1, sum(LENGTHS)))
    ids = segment_ids(LENGTHS)
    expected = model(tokens, segment_ids=ids)
    for block in model.blocks:
        _wrap_training_forward(block, recompute=True, compile=False)
    torch.testing.assert_close(model(tokens, segment_ids=ids), expected)

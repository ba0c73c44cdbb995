"""AU-Net: routes between stages, causality for 2-4 stages and every upsampling mode, the levels
the model finds itself, config errors.

Levels always come from the real split rule on real text (``model(tokens)`` runs it, as
``strata.data.levels`` does), so a perturbed byte also changes the levels after it, as it would in use.
"""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from strata import load_config
from strata.config import ConfigError, validate_config
from strata.data import ByteTokenizer, corpus_path
from strata.data.levels import model_inputs, model_levels
from strata.inference import model_cache
from strata.models import AUNet, build_model
from strata.models.aunet import route

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"

TEXT = (
    b"\x00Whan that Aprille with his shoures soote, the droghte of March hath perced to the roote; "
    b"and bathed every veyne in swich licour 1386.\n\nOf which vertu engendred is the flour."
)


def stage(d_model, layout, **extra):
    return {
        "d_model": d_model,
        "layout": layout,
        "attention": {"n_heads": 2, "n_kv_heads": 1, "rope": {"theta": 10000.0}},
        "sliding_window": {"window": 8, "sinks": 2},
        "mamba": {"d_ssm": 2 * d_model, "d_state": 8, "head_dim": 16, "chunk_size": 8},
        "ffn": {"kind": "swiglu", "d_ffn": 2 * d_model},
        **extra,
    }


def aunet_config(stages=2, upsample="multilinear", layouts=("WA", "MA", "A", "A"), rule="word", **extra):
    widths = (32, 48, 64, 80)
    data = {
        "kind": "aunet",
        "vocab_size": 259,
        "init_std": 0.1,
        "upsample": upsample,
        "max_offset": 4,
        "split": {"rule": rule},
        "stages": [stage(widths[i], layouts[i]) for i in range(stages)],
        **extra,
    }
    return validate_config({"model": data}).model


def build(config, seed=0) -> AUNet:
    torch.manual_seed(seed)
    return build_model(config).eval()


def logits_of(model, tokens):
    with torch.no_grad():
        return model(tokens)


def text_tokens(length=120):
    return torch.tensor([[256, *TEXT[: length - 1]]])


def test_route_selects_splits_and_gives_each_position_its_segment():
    levels = torch.tensor([[2, 0, 1, 0, 0, 2, 1, 0], [2, 1, 1, 0, 0, 0, 0, 0]])
    path = route(levels, 1)
    assert path.index.tolist() == [[0, 2, 5, 6], [0, 1, 2, 0]]
    assert path.real.tolist() == [[True] * 4, [True, True, True, False]]
    assert path.segment.tolist() == [[0, 0, 1, 1, 1, 2, 3, 3], [0, 1, 2, 2, 2, 2, 2, 2]]
    assert path.offset.tolist() == [[0, 1, 0, 1, 2, 0, 0, 1], [0, 0, 0, 1, 2, 3, 4, 5]]
    deeper = route(levels, 2)
    assert deeper.index.tolist() == [[0, 5], [0, 0]] and deeper.real.tolist() == [[True, True], [True, False]]


def test_route_with_a_static_length_drops_extra_splits_and_pads():
    levels = torch.tensor([[2, 1, 1, 1, 0, 1]])
    path = route(levels, 1, max_length=3)
    assert path.index.tolist() == [[0, 1, 2]]
    assert path.segment.tolist() == [[0, 1, 2, 2, 2, 2]]  # later positions keep the last kept vector
    assert path.offset.tolist() == [[0, 0, 0, 1, 2, 3]]
    padded = route(levels, 2, max_length=3)
    assert padded.index.tolist() == [[0, 0, 0]] and padded.real.tolist() == [[True, False, False]]


def assert_causal(model, tokens, positions):
    base = logits_of(model, tokens)
    for t in positions:
        changed = tokens.clone()
        changed[0, t] = (changed[0, t] + 17) % 256
        after = logits_of(model, changed)
        assert torch.equal(after[0, :t], base[0, :t]) or (after[0, :t] - base[0, :t]).abs().max() < 1e-5, t
        assert (after[0, t] - base[0, t]).abs().max() > 1e-4, f"perturbing byte {t} changed nothing at {t}"


@pytest.mark.parametrize("upsample", ["multilinear", "repeat", "simple"])
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_aunet_is_causal(stages, upsample):
    model = build(aunet_config(stages, upsample))
    assert_causal(model, text_tokens(), positions=(1, 4, 5, 30, 62, 63, 64, 100, 119))


@pytest.mark.parametrize("rule", ["pretokenizer", "stride"])
def test_aunet_is_causal_with_other_split_rules(rule):
    assert_causal(build(aunet_config(3, rule=rule)), text_tokens(), positions=(1, 7, 8, 9, 60, 119))


def test_batch_rows_are_independent():
    model = build(aunet_config(3))
    short = text_tokens(50)
    long = text_tokens(80)
    padded = torch.cat([short, torch.full((1, 30), 258)], dim=1)
    both = logits_of(model, torch.cat([padded, long]))
    assert torch.allclose(both[0, :50], logits_of(model, short)[0], atol=1e-5)
    assert torch.allclose(both[1], logits_of(model, long)[0], atol=1e-5)


def test_static_lengths_change_nothing_when_they_are_long_enough():
    free = build(aunet_config(3))
    static = aunet_config(3)
    static.stages[1].max_length, static.stages[2].max_length = 64, 48
    model = build(static)
    tokens = text_tokens(120)
    assert torch.allclose(logits_of(free, tokens), logits_of(model, tokens), atol=1e-5)


def test_route_goes_on_with_a_carried_segment():
    # Decoding: the positions continue a sequence whose segment is open 2 positions past its split.
    path = route(torch.tensor([[0, 0, 1, 0, 1]]), 1, carry=torch.tensor([2]))
    assert path.index.tolist() == [[2, 4]]
    assert path.segment.tolist() == [[0, 0, 1, 1, 2]]  # 0: the carried segment
    assert path.offset.tolist() == [[3, 4, 0, 1, 0]]
    assert route(torch.tensor([[0]]), 1, carry=torch.tensor([5])).offset.tolist() == [[6]]


@pytest.mark.parametrize("preset", ["aunet2", "aunet3"])
def test_forward_finds_the_levels_the_data_pipeline_gives(preset):
    """Rows of Shakespeare as they reach a model: a document from its BOS, the same left-padded, a
    window of a packed stream across a document's end (EOS, BOS), and one that starts at a BOS."""
    torch.manual_seed(0)
    model = build_model(load_config(TINY / f"{preset}.yaml", ["model.init_std=0.1"])).eval()
    text = corpus_path("shakespeare").read_bytes()
    bos, eos, pad = ByteTokenizer.bos_id, ByteTokenizer.eos_id, ByteTokenizer.pad_id
    width = 300
    document = [bos, *text[1000 : 1000 + width - 1]]
    stream = np.array([*document, *text[5000:5100], eos, bos, *text[9000 : 9000 + width]])
    stream_levels = model_levels(model.config, stream)
    rows = [document, [pad] * 40 + document[: width - 40], stream[200 : 200 + width], stream[width + 101 :][:width]]
    tokens = torch.tensor(np.array(rows))
    levels = torch.from_numpy(np.stack([model_levels(model.config, np.array(row)) for row in rows]))
    assert torch.equal(model.split_levels(tokens), levels.long())
    assert torch.equal(levels, model_inputs(model, tokens)["levels"])
    # A window that starts at a BOS has, read alone, the levels the trainer cuts from its stream.
    assert np.array_equal(levels[3].numpy(), stream_levels[width + 101 :][:width])
    with torch.no_grad():
        assert torch.equal(model(tokens), model(tokens, levels=levels))


def test_levels_must_fit_the_tokens_and_a_cache_finds_its_own():
    model = build(aunet_config(2))
    tokens = text_tokens(10)
    with pytest.raises(ValueError, match="shape of tokens"):
        model(tokens, levels=torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="finds the levels"):
        model(tokens, model_cache(model, 1, 10), levels=model.split_levels(tokens))


def test_training_backward_reaches_every_parameter():
    model = build(aunet_config(3)).train()
    tokens = text_tokens(120)
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:]).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["stages"][0].update(split_every=1), "model.stages.0.split_every: stage 1 reads every byte"),
        (lambda d: d["stages"][1].update(split_every=2), "model.stages.2.split_every: give split_every for every stage"),
        (lambda d: [s.update(split_every=v) for s, v in zip(d["stages"][1:], (2, 2))], "model.stages.2.split_every: 2 must exceed"),
        (lambda d: d.update(stages=d["stages"][:1]), "model.stages: List should have at least 2 items"),
        (lambda d: d.update(upsample="nearest"), "model.upsample: Input should be"),
        (lambda d: d["stages"][1].update(layout="AQ"), "model.stages.1.layout: unknown layout symbol 'Q'"),
        (lambda d: d["stages"][2].pop("attention"), "model.stages.2.attention: layout uses 'A' blocks"),
        (lambda d: d.update(kind="unet"), "model: kind must be 'lm'"),
    ],
)
def test_config_errors_name_the_key(change, message):
    data = {"kind": "aunet", "vocab_size": 259, "stages": [stage(32, "WA"), stage(48, "MA"), stage(64, "A")]}
    change(data)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config({"model": data})

"""Weight-decay groups and learning-rate schedules."""

from pathlib import Path

import pytest

from strata import build_model, load_config
from strata.config import TrainConfig
from strata.train.optim import learning_rate_factor, parameter_groups

ROOT = Path(__file__).resolve().parents[1]


def test_decay_only_on_weight_matrices():
    model = build_model(load_config(ROOT / "configs/tiny/intra.yaml"))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "embed.weight" in kept and "norm.weight" in kept
    assert all(name.endswith(("A_log", "dt_bias", ".D", "bias")) or "norm" in name for name in kept - {"embed.weight"})
    assert all(name.endswith("weight") and "norm" not in name for name in decayed)
    assert "blocks.0.mixer.in_proj.weight" in decayed and "blocks.0.mixer.conv1d.weight" in decayed
    assert len(decayed) + len(kept) == len(list(model.parameters()))


def schedule(total, **overrides):
    config = TrainConfig(**overrides)
    return [learning_rate_factor(step, total, config) for step in range(total)]


def test_wsd_warms_up_holds_and_decays_to_the_floor():
    factors = schedule(100, schedule="wsd", warmup=0.1, decay=0.2, min_lr_ratio=0.1)
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(f == 1.0 for f in factors[10:80])
    assert all(a > b for a, b in zip(factors[80:], factors[81:]))
    assert factors[-1] == pytest.approx(0.1)


def test_cosine_ends_at_the_floor_and_constant_stays_flat():
    cosine = schedule(50, schedule="cosine", warmup=0.0, min_lr_ratio=0.0)
    assert cosine[0] == pytest.approx(1.0) and cosine[-1] < 0.01
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    assert set(schedule(20, schedule="constant", warmup=0.0)) == {1.0}


def test_warmup_plus_decay_longer_than_the_run_is_a_config_error():
    from strata.config import ConfigError, load_config as load

    with pytest.raises(ConfigError, match="train.decay"):
        load(ROOT / "configs/tiny/transformer.yaml", ["train.warmup=0.5", "train.decay=0.6"])

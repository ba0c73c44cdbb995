"""Multi-query associative recall: the generator's examples, the recall of oracle, uniform and random
models, the models of every family, a tiny training run, the table and the plot."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from strata.evals.mqar import (
    FILLER,
    IGNORE,
    asked_pairs,
    evaluate_mqar,
    make_mqar,
    mqar_grid,
    mqar_ids,
    mqar_markdown,
    plot_mqar,
)
from strata.evals.mqar_train import (
    FAMILIES,
    LEARNING_RATES,
    mqar_layout,
    mqar_model_config,
    mqar_recipe,
    train_mqar,
)


class Uniform(nn.Module):
    """The same logit for every token."""

    def __init__(self, vocab_size: int = 259):
        super().__init__()
        self.vocab_size = vocab_size
        self.unused = nn.Parameter(torch.zeros(1))  # gives the evaluation a device

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, self.vocab_size)


class RandomLogits(Uniform):
    """Fresh standard-normal logits at every position: no ties, a random guess."""

    def forward(self, tokens):
        return torch.randn(*tokens.shape, self.vocab_size)


class Oracle(Uniform):
    """Reads the pairs from the tokens: after a key seen before, a peak at the value that followed it."""

    def __init__(self, looks_before: int | None = None):
        super().__init__()
        self.looks_before = looks_before  # pairs are only read at positions below this (None: anywhere)

    def forward(self, tokens):
        logits = super().forward(tokens)
        keys, _ = mqar_ids()
        limit = tokens.shape[1] if self.looks_before is None else self.looks_before
        for row, ids in enumerate(tokens.tolist()):
            paired = {}
            for position, token in enumerate(ids):
                if token in paired:
                    logits[row, position, paired[token]] = 10.0
                elif token in keys and position + 1 < limit:
                    paired[token] = ids[position + 1]
        return logits


def test_every_query_target_is_the_value_paired_with_its_key():
    inputs, targets = make_mqar(50, 96, 12, seed=3)
    keys, values = mqar_ids()
    assert inputs.shape == targets.shape == (50, 96) and inputs.dtype == targets.dtype == torch.int64
    for ids, wanted in zip(inputs.tolist(), targets.tolist(), strict=True):
        pairs = dict(zip(ids[0:24:2], ids[1:24:2], strict=True))
        assert len(pairs) == 12 and all(k in keys for k in pairs) and all(v in values for v in pairs.values())
        assert len(set(pairs.values())) == 12  # distinct values: each names one key
        asked = [p for p, target in enumerate(wanted) if target != IGNORE]
        assert len(asked) == 12 and min(asked) >= 24  # every key asked once, after the pairs
        assert sorted(ids[p] for p in asked) == sorted(pairs)
        for position in asked:
            assert wanted[position] == pairs[ids[position]] == ids[position + 1]
        others = [token for p, token in enumerate(ids[24:], start=24) if p not in asked and p - 1 not in asked]
        assert set(others) <= {FILLER}


def test_queries_come_in_random_order_at_random_places():
    inputs, targets = make_mqar(200, 128, 8, seed=0)
    first_positions = set()
    in_pair_order = 0
    for ids, wanted in zip(inputs.tolist(), targets.tolist(), strict=True):
        asked = [p for p, target in enumerate(wanted) if target != IGNORE]
        first_positions.add(asked[0])
        in_pair_order += [ids[p] for p in asked] == ids[0:16:2]
    assert len(first_positions) > 10 and in_pair_order <= 2


def test_fewer_queries_than_pairs():
    _, targets = make_mqar(10, 64, 8, n_queries=3, seed=1)
    assert ((targets != IGNORE).sum(dim=1) == 3).all()


def test_same_seed_same_examples_other_seed_other_examples():
    first, second, other = make_mqar(8, 64, 8, seed=5), make_mqar(8, 64, 8, seed=5), make_mqar(8, 64, 8, seed=6)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], other[0])


def test_id_ranges_are_disjoint_and_fit_the_vocabulary():
    keys, values = mqar_ids(256)
    assert FILLER not in keys and FILLER not in values and not set(keys) & set(values)
    assert len(keys) == len(values) == 127 and values.stop <= 256
    inputs, _ = make_mqar(4, 40, 10, vocab_size=23, seed=0)
    assert int(inputs.max()) < 23


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"seq_len": 30, "n_pairs": 8}, "at least 32 tokens"),
        ({"seq_len": 200, "n_pairs": 40, "vocab_size": 64}, "31 distinct keys"),
        ({"seq_len": 64, "n_pairs": 0}, "n_pairs must be at least 1"),
        ({"seq_len": 64, "n_pairs": 4, "n_queries": 5}, "n_queries must be between 1 and n_pairs"),
        ({"seq_len": 64, "n_pairs": 4, "vocab_size": 2}, "vocab_size must be at least 3"),
        ({"seq_len": 64, "n_pairs": 4, "n_examples": 0}, "n_examples must be at least 1"),
    ],
)
def test_impossible_examples_are_refused_with_the_reason(arguments, message):
    with pytest.raises(ValueError, match=message):
        make_mqar(**{"n_examples": 2, **arguments})


def test_an_oracle_recalls_everything():
    result = evaluate_mqar(Oracle(), 64, 8, n_examples=40, batch_size=16)
    assert result["recall"] == 1.0 and result["n"] == 40 * 8


def test_asked_pairs_are_the_places_of_the_queried_keys():
    inputs, targets = make_mqar(20, 64, 8, seed=4)
    places = asked_pairs(inputs, targets, 8)
    rows, positions = torch.nonzero(targets != IGNORE, as_tuple=True)
    assert torch.equal(inputs[rows, 2 * places], inputs[rows, positions])  # the key at the pair's place
    assert torch.equal(inputs[rows, 2 * places + 1], targets[rows, positions])  # and its value after it
    assert sorted(places[rows == 0].tolist()) == list(range(8))  # all pairs asked, each once


def test_recall_by_place_finds_a_model_that_reads_only_the_first_pairs():
    # Pairs at positions 0-15: reading below position 8 sees the first 4 of 8 pairs, two quarters.
    result = evaluate_mqar(Oracle(looks_before=8), 64, 8, n_examples=40)
    assert result["recall_by_place"][:2] == [1.0, 1.0]
    assert result["recall_by_place"][2:] == pytest.approx([result["chance"]] * 2, rel=1e-6)
    assert result["recall"] == pytest.approx((1 + result["chance"]) / 2, rel=1e-6)
    assert evaluate_mqar(Oracle(), 32, 2, n_examples=4)["recall_by_place"] == [1.0, None, 1.0, None]


def test_constant_logits_score_exactly_chance():
    result = evaluate_mqar(Uniform(), 64, 8, n_examples=40)
    assert result["chance"] == 1 / 127
    assert result["recall"] == pytest.approx(result["chance"], rel=1e-6)


def test_random_logits_score_chance_within_sampling_error():
    torch.manual_seed(0)
    result = evaluate_mqar(RandomLogits(), 64, 16, n_examples=2000, batch_size=500)
    chance, n = result["chance"], result["n"]
    assert abs(result["recall"] - chance) < 4 * np.sqrt(chance * (1 - chance) / n)


def test_evaluation_restores_training_mode_and_refuses_a_small_vocabulary():
    model = Uniform()
    model.train()
    evaluate_mqar(model, 32, 4, n_examples=4)
    assert model.training
    with pytest.raises(ValueError, match="model's vocabulary has 128"):
        evaluate_mqar(_with_vocab(128), 32, 4, n_examples=4)


def _with_vocab(vocab_size: int) -> nn.Module:
    model = Uniform(vocab_size)
    model.config = mqar_model_config("attention", vocab_size=vocab_size)
    return model


def test_grid_leaves_out_impossible_combinations():
    results = mqar_grid(Oracle(), [32, 64], [4, 8, 16], n_examples=4)
    assert [(row["seq_len"], row["n_pairs"]) for row in results] == [(32, 4), (32, 8), (64, 4), (64, 8), (64, 16)]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_at_one_width_and_depth(family):
    config = mqar_model_config(family, d_model=64, n_layers=2)
    assert config.layout == mqar_layout(family, 2) and len(config.layout) == 2 and config.d_model == 64
    assert {"attention": "AA", "mamba2": "MM", "inter": "AM", "intra": "MH"}[family] == config.layout


def test_unknown_family_is_refused():
    for make in (mqar_model_config, mqar_recipe):
        with pytest.raises(ValueError, match="unknown MQAR family 'rnn'; known: attention"):
            make("rnn")


def test_the_recipe_trains_each_family_at_its_own_rate_on_the_same_task():
    recipes = {family: mqar_recipe(family) for family in FAMILIES}
    assert {recipe["lr"] for recipe in recipes.values()} == set(LEARNING_RATES.values())
    assert len({(r["seq_len"], r["n_pairs"], r["batch_size"], r["steps"]) for r in recipes.values()}) == 1


@pytest.mark.parametrize("family", ["inter", "intra"])
def test_a_few_training_steps_run_end_to_end(family):
    config = mqar_model_config(family, d_model=32, head_dim=16, context_length=64)
    seen = []
    model, history = train_mqar(config, seq_len=32, n_pairs=[2, 4], steps=6, batch_size=4, lr=3e-3,
                                eval_every=3, eval_examples=8, callback=seen.append)
    assert [record["step"] for record in history] == list(range(1, 7)) and seen == history
    assert all(np.isfinite(record["loss"]) for record in history)
    assert [record["step"] for record in history if "recall" in record] == [3, 6]
    assert not model.training
    assert 0 <= evaluate_mqar(model, 64, 4, n_examples=8)["recall"] <= 1  # twice the training length


def test_training_stops_at_the_time_limit():
    config = mqar_model_config("attention", d_model=32, head_dim=16, context_length=32)
    _, history = train_mqar(config, seq_len=32, n_pairs=4, steps=10_000, batch_size=2, time_limit=0.5,
                            eval_examples=4)
    assert len(history) < 10_000 and "recall" in history[-1]
    assert history[-1]["time"] <= 0.5 + 2 * max(b["time"] - a["time"] for a, b in itertools.pairwise(history))


def test_training_refuses_a_length_beyond_the_context():
    config = mqar_model_config("attention", d_model=32, head_dim=16, context_length=32)
    with pytest.raises(ValueError, match="exceeds the model's context_length 32"):
        train_mqar(config, seq_len=64, n_pairs=4, steps=1)


def test_table_and_plot(tmp_path):
    from matplotlib import image

    results = [{"family": family, "seq_len": seq_len, "n_pairs": n_pairs, "recall": recall, "n": 10, "chance": 1 / 127}
               for family, seq_len, n_pairs, recall in [("attention", 64, 4, 1.0), ("attention", 64, 8, 0.95),
                                                        ("mamba2", 64, 4, 0.5), ("attention", 128, 8, 0.25)]]
    table = mqar_markdown(results)
    assert "| family | seq len | 4 pairs | 8 pairs |" in table
    assert "| attention | 64 | 100.0 | 95.0 |" in table and "| mamba2 | 64 | 50.0 | – |" in table
    assert "| attention | 128 | – | 25.0 |" in table and "chance 0.79 %" in table
    assert "By where the asked pair stands" not in table  # these rows have no split by place
    results[1]["recall_by_place"] = [1.0, 1.0, 0.9, 0.9]
    results[0]["recall_by_place"] = [1.0] * 4
    assert "| attention | 64 | 8 | 100.0 | 100.0 | 90.0 | 90.0 |" in mqar_markdown(results)  # the largest pair count
    path = plot_mqar(results, tmp_path / "mqar.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100

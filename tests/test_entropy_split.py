"""AU-Net's entropy rule (``split: {rule: entropy}``, BLT's entropy patching): a byte model's
next-byte entropies place the splits.

The levels of a whole document and of a stream fed a few bytes at a time are the same, across the
byte model's window restarts and through multi-byte characters; they follow the entropies of the
model's softmax by the thresholds and the margin, computed here by hand; an AU-Net with the rule
decodes through its caches as its full forward runs; a run trained by ``strata train`` carries
the byte model's weights in its checkpoint and opens without the byte model's run; config errors
name the key. The byte model has random weights (``init_std`` 0.3 spreads its entropies over
~4-7 bits), except in the run, which copies a random byte model saved as a run.
"""

import copy
import shutil

import numpy as np
import pytest
import torch
from cli_runner import REPRODUCIBLE_BLAS, ROOT, strata
from test_aunet import aunet_config, build
from test_aunet_generate import assert_cached_and_chunked_generation_recompute

from strata import load_config
from strata.config import AUNetConfig, ConfigError, TrainConfig, validate_config
from strata.cost.aunet import aunet_cost, default_contraction, measure_contraction
from strata.data import ByteTokenizer, corpus_path, entropy_store
from strata.data.levels import TokenLevels, model_levels, splitter_for, stream_levels
from strata.data.splitter import make_splitter
from strata.inference.generate import generate
from strata.models.entropy import EntropyModel
from strata.models.lm import LanguageModel
from strata.train.optim import build_optimizer
from strata.train.runs import TrainedModel, from_pretrained, save_as_run
from strata.train.trainer import Trainer

WINDOW = 16
BYTE_MODEL = {
    "vocab_size": 259, "d_model": 32, "layout": "AA", "context_length": 64, "init_std": 0.3,
    "attention": {"n_heads": 2, "n_kv_heads": 2, "rope": {"theta": 10000.0}}, "ffn": {"kind": "swiglu", "d_ffn": 64},
}  # fmt: skip
# The thresholds and margin of the tests (bits), for the random byte model above.
THRESHOLDS, MARGIN = (6.1, 6.5), 0.9
# A real text: Shakespeare, then characters of 2, 3 and 4 bytes; 340 bytes, 22 windows of 16.
TEXT = corpus_path("shakespeare").read_bytes()[:280] + "Ça, Жук и 日本語 🙂 — fin.\n".encode()


def byte_config():
    return validate_config({"model": BYTE_MODEL}).model


def random_byte_model(seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(byte_config()).eval()


def entropy_model(window: int = WINDOW) -> EntropyModel:
    entropy = EntropyModel(byte_config(), window)
    entropy.lm.load_state_dict(random_byte_model().state_dict())
    return entropy


def entropy_splitter(stages: int = 3, margin=MARGIN):
    return make_splitter("entropy", stages, score=entropy_model().score, window=WINDOW,
                         thresholds=THRESHOLDS[: stages - 1], margin=margin)


def entropy_aunet(stages: int = 3) -> AUNetConfig:
    split = {"rule": "entropy", "model": "unused: byte_model is given", "thresholds": list(THRESHOLDS[: stages - 1]),
             "margin": MARGIN, "window": WINDOW, "byte_model": BYTE_MODEL}
    return aunet_config(stages, layouts=("WA", "A", "A"), split=split)


def with_random_entropy_model(model):
    model.entropy.lm.load_state_dict(random_byte_model().state_dict())
    return model


# ---------------------------------------------------------------------------------------------
# (a) whole documents and streams


def test_streamed_levels_equal_whole_document_levels():
    splitter = entropy_splitter()
    whole = splitter.levels(TEXT)
    assert set(whole.tolist()) == {0, 1, 2}  # every level occurs
    rng = np.random.default_rng(0)
    for _ in range(3):
        cuts = np.cumsum(rng.integers(1, 8, size=len(TEXT)))
        cuts = [0, *cuts[cuts < len(TEXT)].tolist(), len(TEXT)]
        # Some pieces end inside a multi-byte character, some windows start there.
        assert any(0x80 <= TEXT[cut] < 0xC0 for cut in cuts[1:-1])
        stream = splitter.stream()
        streamed = np.concatenate([stream.feed(TEXT[start:end]) for start, end in zip(cuts, cuts[1:])])
        assert streamed.tolist() == whole.tolist()
    for cut in range(0, len(TEXT), 9):  # stable: a prefix has the prefix's levels, window restarts included
        assert splitter.levels(TEXT[:cut]).tolist() == whole[:cut].tolist(), cut


def test_token_streams_restart_the_windows_at_each_document():
    splitter = entropy_splitter()
    ids = np.array([ByteTokenizer.bos_id, *TEXT[:100], ByteTokenizer.bos_id, *TEXT[100:250]])
    whole = stream_levels(ids, splitter)
    assert whole[101] == 2 and whole[102:].tolist() == splitter.levels(TEXT[100:250]).tolist()
    levels, rng, start, fork = TokenLevels(splitter), np.random.default_rng(1), 0, None
    fed = []
    while start < len(ids):
        size = int(rng.integers(1, 8))
        fed.append(levels.feed(ids[start : start + size]))
        start += size
        if fork is None and start >= 60:  # a copy goes on on its own, sharing the splitter and its model
            fork, forked_at = copy.deepcopy(levels), start
            assert fork.splitter is levels.splitter
    assert np.concatenate(fed).tolist() == whole.tolist()
    assert fork.feed(ids[forked_at:]).tolist() == whole[forked_at:].tolist()


# ---------------------------------------------------------------------------------------------
# (b) the rule by hand


def entropies_by_hand(text: bytes) -> np.ndarray:
    """H_i in bits from the byte model's softmax in float64, window by window: BOS and the
    window's bytes (no padding), the distribution at byte i's position."""
    model = random_byte_model().double()
    entropies = []
    for start in range(0, len(text), WINDOW):
        window = text[start : start + WINDOW]
        with torch.no_grad():
            logits = model(torch.tensor([[256, *window]]))[0, 1:]
        p = torch.softmax(logits.double(), dim=-1)
        entropies.extend((-(p * torch.log2(p)).sum(-1)).tolist())
    return np.array(entropies)


def test_levels_follow_the_entropies_by_the_thresholds_and_the_margin():
    splitter = entropy_splitter()
    by_hand = entropies_by_hand(TEXT)
    np.testing.assert_allclose(splitter.entropies(TEXT), by_hand, rtol=0, atol=1e-9)
    # No entropy or rise within 1e-6 bits of a threshold: the comparisons below are clear-cut.
    assert np.abs(by_hand[:, None] - np.array([6.1, 6.5])).min() > 1e-6
    assert np.abs(np.diff(by_hand) - 0.9).min() > 1e-6
    expected = []
    for i, h in enumerate(by_hand):
        level = 0
        if h > 6.1:
            level = 1
        if h > 6.5:
            level = 2
        if i > 0 and h - by_hand[i - 1] > 0.9:  # the margin; a document's first byte has none before it
            level = max(level, 1)
        expected.append(level)
    levels = splitter.levels(TEXT).tolist()
    assert levels == expected
    without_margin = entropy_splitter(margin=None).levels(TEXT).tolist()
    assert sum(levels) > sum(without_margin)  # the margin adds splits
    assert without_margin == [int(h > 6.1) + int(h > 6.5) for h in by_hand]


# ---------------------------------------------------------------------------------------------
# (c) the AU-Net


def test_an_entropy_aunet_decodes_through_its_caches_as_its_full_forward_runs():
    torch.manual_seed(1)
    model = with_random_entropy_model(build(entropy_aunet(3)))
    tokens = torch.tensor([[256, *TEXT[:120]]])
    levels = model.split_levels(tokens)[0]
    assert levels[1:].tolist() == model.entropy.splitter(model.config).levels(TEXT[:120]).tolist()
    assert torch.equal(model.boundary_levels(tokens), model.split_levels(tokens))
    assert levels.tolist() == model_levels(model, tokens[0].numpy()).tolist()
    # 264 - 200 = 4 windows: the next byte opens one
    assert_cached_and_chunked_generation_recompute(model, [TEXT[:1], TEXT[:33], TEXT[200:264]], 5)


def test_the_entropy_model_is_frozen_and_keeps_its_dtype():
    model = with_random_entropy_model(build(entropy_aunet(2)))
    entropy = list(model.entropy.parameters())
    assert entropy and not any(parameter.requires_grad for parameter in entropy)
    optimised = {id(p) for group in build_optimizer(model, TrainConfig()).param_groups for p in group["params"]}
    assert optimised.isdisjoint(id(parameter) for parameter in entropy)
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(name.startswith("entropy.lm.") for name in model.state_dict() if "entropy" in name)
    before = model.split_levels(torch.tensor([[256, *TEXT[:90]]]))
    model.to(torch.bfloat16)  # the AU-Net's dtype; the byte model stays as trained
    assert model.embed.weight.dtype == torch.bfloat16
    assert all(parameter.dtype == torch.float32 for parameter in model.entropy.parameters())
    assert torch.equal(model.split_levels(torch.tensor([[256, *TEXT[:90]]])), before)


def test_a_run_trained_on_the_rule_carries_its_byte_model(tmp_path):
    # The byte model: random weights saved as a strata run (what `strata train` would leave).
    byte_run = tmp_path / "byte"
    byte_config = validate_config({"model": BYTE_MODEL, "data": {"tokenizer": "bytes"}})
    save_as_run(TrainedModel(byte_config, random_byte_model(), ByteTokenizer(), tmp_path / "random"), byte_run)
    data = tmp_path / "text.txt"
    data.write_bytes(corpus_path("shakespeare").read_bytes()[:6000])
    run = tmp_path / "aunet"
    split = f"{{rule: entropy, model: {byte_run}, thresholds: [6.3], margin: 0.9, window: {WINDOW}}}"
    strata("train", ROOT / "configs/tiny/aunet2.yaml", "--data", data, "--steps", 2, "--out", run, "--quiet",
           f"model.split={split}", "model.context_length=64", "train.batch_size=2", "train.eval_bytes=512",
           "train.save_every=2", env=REPRODUCIBLE_BLAS)  # one thread: quick beside other jobs too
    saved = load_config(run / "config.yaml").model.split
    assert saved.byte_model == byte_config.model  # the architecture travels in the run's config
    shutil.rmtree(byte_run)  # the weights travel in its checkpoint: it resumes and opens without the byte run
    reference = make_splitter("entropy", 2, score=entropy_model().score, window=WINDOW, thresholds=[6.3], margin=0.9)
    resumed = Trainer(load_config(run / "config.yaml", ["train.steps=3"]), run, resume=True, quiet=True)
    # The training stream's levels come from the checkpoint's byte model, restored before them.
    assert resumed.loader.levels.tolist() == stream_levels(resumed.loader.tokens, reference).tolist()
    assert resumed.step == 2 and resumed.total_steps == 3
    trained = from_pretrained(run)
    for name, weight in random_byte_model().state_dict().items():
        assert torch.equal(trained.model.state_dict()[f"entropy.lm.{name}"], weight), name
    assert trained.model.splitter.levels(TEXT).tolist() == reference.levels(TEXT).tolist()
    prompt = TEXT[:40]
    cached = generate(trained.model, prompt, 12, tokenizer=trained.tokenizer)[0]
    full = generate(trained.model, prompt, 12, tokenizer=trained.tokenizer, use_cache=False)[0]
    assert cached.tokens == full.tokens and len(cached.tokens) == 12


# ---------------------------------------------------------------------------------------------
# (d) config errors and costs


def aunet_data(split, stages=2, **stage_extra):
    widths = (32, 64, 96)
    return {"model": {"kind": "aunet", "vocab_size": 259, "split": split,
                      "stages": [{"d_model": widths[i], "layout": "A", "attention": {"n_heads": 2, "n_kv_heads": 2},
                                  **(stage_extra if i else {})} for i in range(stages)]}}


ENTROPY = {"rule": "entropy", "model": "runs/byte-entropy", "thresholds": [3.0]}


@pytest.mark.parametrize(
    "split, stages, extra, key, message",
    [
        ({**ENTROPY, "thresholds": [3.0]}, 3, {}, "model.split.thresholds", "give one per level 1..2"),
        ({**ENTROPY, "thresholds": [3.0, 2.0]}, 3, {}, "model.split.thresholds", "must increase"),
        ({**ENTROPY, "thresholds": [-1.0]}, 2, {}, "model.split.thresholds", "must be finite numbers of bits >= 0"),
        ({"rule": "entropy", "thresholds": [3.0]}, 2, {}, "model.split.model", "required for the entropy rule"),
        ({"rule": "entropy", "model": "runs/x"}, 2, {}, "model.split.thresholds", "required for the entropy rule"),
        ({**ENTROPY, "margin": -0.5}, 2, {}, "model.split.margin", "greater than or equal to 0"),
        ({**ENTROPY, "window": 0}, 2, {}, "model.split.window", "greater than 0"),
        ({**ENTROPY, "window": 64, "byte_model": BYTE_MODEL}, 2, {}, "model.split.window", "beyond its context_length 64"),
        (ENTROPY, 2, {"split_every": 4}, "model.stages.1.split_every", "does not apply to the entropy rule"),
        ({"rule": "word", "thresholds": [3.0]}, 2, {}, "model.split.thresholds", "applies to the entropy rule; rule is word"),
        ({"rule": "learned", "model": "runs/x"}, 2, {}, "model.split.model", "applies to the entropy rule; rule is learned"),
        ({"rule": "stride", "margin": 1.0}, 2, {}, "model.split.margin", "applies to the entropy rule"),
        ({"rule": "word", "window": 64}, 2, {}, "model.split.window", "applies to the entropy rule"),
    ],
)
def test_config_errors_name_the_key(split, stages, extra, key, message):
    with pytest.raises(ConfigError, match=rf": {key}: .*{message}"):
        validate_config(aunet_data(split, stages, **extra))


def test_a_missing_byte_model_run_is_named_and_costs_fall_back_to_an_assumed_contraction(tmp_path):
    config = validate_config(aunet_data({**ENTROPY, "model": str(tmp_path / "none")})).model
    assert config.split.window == 128  # the default, written out
    with pytest.raises(ConfigError, match=r"model.split.model: .*none holds no strata run .*strata train"):
        build(config)
    contraction, source = default_contraction(config, 1024)
    assert contraction == [1.0, 5.0] and "entropy rule" in source
    assert aunet_cost(config).contraction_source == source
    with pytest.raises(ValueError, match="pass splitter="):
        measure_contraction(config, [TEXT])
    with pytest.raises(ValueError, match="use the AU-Net's splitter"):
        splitter_for(config)


def test_the_contraction_is_measured_with_the_models_splitter():
    model = with_random_entropy_model(build(entropy_aunet(3)))
    levels = model.splitter.levels(TEXT)
    measured = measure_contraction(model.config, [TEXT], model.splitter)
    assert measured == [1.0, (len(TEXT) + 1) / (1 + (levels >= 1).sum()), (len(TEXT) + 1) / (1 + (levels >= 2).sum())]


# ---------------------------------------------------------------------------------------------
# (f) the entropies of large texts, kept on disk


def test_a_stream_is_scored_once_and_every_threshold_reads_its_entropies_back(tmp_path, monkeypatch):
    """The levels from the store equal the levels scored afresh, for the thresholds that saved
    them and for others; new weights, another window or a damaged file are scored again."""
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path))
    monkeypatch.setattr(entropy_store, "STORE_MIN_BYTES", 200)  # TEXT's 340 bytes are "large"
    ids = np.array([ByteTokenizer.bos_id, *TEXT[:150], ByteTokenizer.bos_id, *TEXT[150:]])
    entropy = entropy_model()
    scored = []

    def counting(window: bytes) -> np.ndarray:
        scored.append(len(window))
        return entropy.score(window)

    def splitter(thresholds=THRESHOLDS, window=WINDOW):
        return make_splitter("entropy", 3, score=counting, window=window, thresholds=thresholds, margin=MARGIN,
                             identity=entropy.fingerprint)

    def afresh(thresholds=THRESHOLDS, window=WINDOW):  # no identity: nothing stored or read
        fresh = make_splitter("entropy", 3, score=entropy.score, window=window, thresholds=thresholds, margin=MARGIN)
        return stream_levels(ids, fresh).tolist()

    first = stream_levels(ids, splitter()).tolist()
    assert first == afresh() and sum(scored) == len(TEXT)
    assert len(list((tmp_path / "entropies").glob("*.npy"))) == 1
    scored.clear()
    assert stream_levels(ids, splitter()).tolist() == first and not scored
    other = (5.9, 6.3)
    assert stream_levels(ids, splitter(other)).tolist() == afresh(other) != first and not scored

    assert stream_levels(ids, splitter(window=8)).tolist() == afresh(window=8) and sum(scored) == len(TEXT)
    scored.clear()
    with torch.no_grad():
        entropy.lm.embed.weight[ord("e")] += 1.0  # new weights: a new fingerprint
    assert stream_levels(ids, splitter()).tolist() == afresh() != first and sum(scored) == len(TEXT)
    assert len(list((tmp_path / "entropies").glob("*.npy"))) == 3

    for stored in (tmp_path / "entropies").glob("*.npy"):
        stored.write_bytes(stored.read_bytes()[:100])  # cut short
    scored.clear()
    assert stream_levels(ids, splitter()).tolist() == afresh() and sum(scored) == len(TEXT)
    assert not list((tmp_path / "entropies").glob("*.partial"))


def test_short_texts_and_splitters_without_an_identity_are_not_stored(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path))
    ids = np.array([ByteTokenizer.bos_id, *TEXT])
    entropy = entropy_model()
    with_identity = make_splitter("entropy", 3, score=entropy.score, window=WINDOW, thresholds=THRESHOLDS,
                                  margin=MARGIN, identity=entropy.fingerprint)
    stream_levels(ids, with_identity)  # 340 bytes: under STORE_MIN_BYTES
    monkeypatch.setattr(entropy_store, "STORE_MIN_BYTES", 200)
    stream_levels(ids, entropy_splitter())  # no identity
    assert not (tmp_path / "entropies").exists()
    assert model_levels(with_random_entropy_model(build(entropy_aunet(3))), ids) is not None
    assert len(list((tmp_path / "entropies").glob("*.npy"))) == 1  # an AU-Net's splitter has one

"""Learned splitting (``split: {rule: learned}``, H-Net's dynamic chunking in strata.models.chunking):
the ratio loss against H-Net's formula at literal points, causality of the boundaries and logits,
the straight-through confidence, and the boundaries a full forward reports."""

from pathlib import Path

import pytest
import torch

from strata import ConfigError, build_model, load_config
from strata.models.chunking import Chunking, Router

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
TEXT = (b"Before we proceed any further, hear me speak.\nSpeak, speak.\nYou are all resolved rather to "
        b"die than to famish?\nResolved. resolved.\n")


HELD_OUT = (b"The river had risen in the night, and by morning the lower fields were under water. Farmers "
            b"stood along the road and watched the brown current carry fence posts, straw and a wooden door "
            b"past the mill. Nobody spoke much. The older ones remembered the flood of their childhood, when "
            b"the bridge had gone and the village was cut off for a week; the younger ones took photographs "
            b"and sent them to friends in the city. By noon the rain stopped, the clouds broke apart, and a "
            b"thin light fell across the drowned meadows, so that for an hour the whole valley shone like a "
            b"lake. Then the water began, very slowly, to go down.\n") * 4


def hnet2(seed=0):
    torch.manual_seed(seed)
    return build_model(load_config(TINY / "hnet2.yaml", ["model.context_length=256"]))


def tokens(text=TEXT):
    return torch.tensor([[256, *text]])


@pytest.mark.parametrize("rate, mean_p, target, expected", [
    (0.25, 0.25, 4, 1.0),  # at the target (F = G = 1/N) the loss is 1, its minimum
    (0.5, 0.5, 4, 4 / 3 * (3 * 0.25 + 0.25)),
    (0.0, 0.2, 4, 4 / 3 * 0.8),  # nothing chosen
    (1.0, 0.9, 2, 2 * 0.9),  # everything chosen
])
def test_the_ratio_loss_is_h_nets(rate, mean_p, target, expected):
    """L = N/(N−1) · ((N−1) F G + (1−F)(1−G)) at points worked out by hand. 20 free positions:
    F of them chosen (p = 0.75 > 0.5 each, or 1), the rest unchosen, p set so that the mean is G."""
    n = 20
    chosen = round(rate * n)
    p = torch.full((1, n + 1), 0.0)
    p[0, 1:chosen + 1] = 0.75 if chosen < n else 0.9
    rest = n - chosen
    if rest:
        p[0, chosen + 1:] = (mean_p * n - p[0, 1:chosen + 1].sum()) / rest
    assert 0 <= p.min() and (p[0, chosen + 1:] < 0.5).all()
    levels = torch.zeros(1, n + 1, dtype=torch.long)
    levels[0, 0] = 1  # a forced split (BOS): not counted
    chunking = Chunking(p, levels, depth=1)
    assert chunking.rate().item() == pytest.approx(rate)
    assert chunking.ratio_loss(target).item() == pytest.approx(expected, rel=1e-5)


def test_the_router_scores_adjacent_states_by_their_cosine():
    """p_t = (1 − cos(W_q x_t, W_k x_{t−1}))/2 with W_q = W_k = I at the start: equal neighbours
    give 0, opposite ones 1, orthogonal ones 1/2; the first position has no neighbour (p = 1)."""
    router = Router(4)
    router.reset_parameters()
    x = torch.tensor([[[1.0, 0, 0, 0], [2.0, 0, 0, 0], [-1.0, 0, 0, 0], [0, 3.0, 0, 0]]])
    p, last_key = router(x, None)
    torch.testing.assert_close(p, torch.tensor([[1.0, 0.0, 1.0, 0.5]]))
    continued, _ = router(x[:, 2:], router.k_proj(x[:, 1:2]))  # the key of the position before, carried
    torch.testing.assert_close(continued, p[:, 2:])
    torch.testing.assert_close(last_key, x[:, -1:])


def test_a_boundary_and_a_logit_depend_on_no_later_byte():
    """Changing byte t changes no logit and no boundary before t, and the boundaries are neither
    all nor none of the positions (so the check has something to hold)."""
    model = hnet2().eval()
    original = tokens()
    with torch.no_grad():
        logits, levels = model(original), model.boundary_levels(original)
        assert 0.05 < (levels[0, 1:] > 0).float().mean() < 0.95
        for t in (20, 57, 100):
            changed = original.clone()
            changed[0, t] = (changed[0, t] + 7) % 256
            assert torch.equal(model(changed)[0, :t], logits[0, :t]), t
            assert torch.equal(model.boundary_levels(changed)[0, :t], levels[0, :t]), t


def test_the_confidence_is_one_forward_and_gives_the_router_a_gradient():
    """The straight-through c + sg(1 − c) leaves the forward pass as it is (the upsampled output
    unchanged) and the router gets a gradient from the next-byte loss alone (no ratio loss)."""
    model = hnet2()
    logits = model(tokens())
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], tokens()[0, 1:])
    loss.backward()
    router = model.routers[0]
    assert router.q_proj.weight.grad.abs().sum() > 0 and router.k_proj.weight.grad.abs().sum() > 0
    p = torch.tensor([[1.0, 0.7, 0.2]])
    chunking = Chunking(p, torch.tensor([[1, 0, 0]]), depth=1)
    up = torch.randn(1, 3, 5)
    torch.testing.assert_close(chunking.confident(up), up)


def test_the_boundaries_reported_are_those_the_forward_pools_at():
    """boundary_levels: BOS at the top level, and as many stage-2 positions as the trunk runs on
    (counted from the positions the trunk's first block sees)."""
    model = hnet2().eval()
    seen = []
    hook = model.trunk[0].register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0].shape[1]),
                                                    with_kwargs=True)
    with torch.no_grad():
        model(tokens())
        hook.remove()
        levels = model.boundary_levels(tokens())
    assert levels[0, 0] == 1
    assert seen == [int((levels[0] >= 1).sum())]


def test_the_learned_rule_stands_in_for_the_split_rule_elsewhere():
    """The cost model takes the targets as the contraction and counts the routers (W_q, W_k of
    the byte stage's width); the config's targets double by default, and start at 2 or more."""
    from strata.cost.aunet import aunet_cost

    config = load_config(TINY / "hnet2.yaml").model
    assert config.learned_compression() == [4.0]
    cost, word_rule = aunet_cost(config, 1024, "fp32"), aunet_cost(load_config(TINY / "aunet2.yaml").model, 1024, "fp32")
    assert cost.contraction == [1.0, 4.0]
    assert cost.params - word_rule.params == 2 * 64 * 64 == sum(p.numel() for p in hnet2().routers.parameters())
    three = load_config(TINY / "aunet3.yaml", ["model.split.rule=learned"]).model
    assert three.learned_compression() == [4.0, 8.0]
    with pytest.raises(ConfigError, match="stages.1.split_every: the learned rule needs a target of 2 or more"):
        load_config(TINY / "hnet2.yaml", ["model.stages.1.split_every=1"])


def test_the_ratio_loss_brings_the_compression_to_its_target(tmp_path):
    """300 training steps on Shakespeare (a smaller hnet2: a byte stage of d 32, a trunk of two
    blocks of d 64): the bytes per trunk position that ``strata eval --boundaries`` measures on
    held-out text are within 10 % of the target, 4."""
    import json

    from cli_runner import strata

    run = tmp_path / "run"
    strata("train", TINY / "hnet2.yaml", "--steps", 300, "--out", run, "--quiet",
           "model.context_length=128", "train.batch_size=4", "train.eval_every=300", "train.save_every=300",
           "train.eval_bytes=4096", "model.stages.0.d_model=32", "model.stages.0.ffn.d_ffn=96",
           "model.stages.1.d_model=64", "model.stages.1.layout=AA", "model.stages.1.ffn.d_ffn=192",
           "model.stages.1.attention.n_heads=2", "model.stages.1.attention.n_kv_heads=2")
    text = tmp_path / "held-out.txt"  # prose that is not Shakespeare's
    text.write_bytes(HELD_OUT)
    result = json.loads(strata("eval", run, "--boundaries", text, "--json").stdout)
    trunk = result["boundaries"]["stages"][0]
    assert abs(trunk["bytes_per_position"] - 4) <= 0.4, trunk

"""Configuration loading, overrides, resolution and one-line errors that name the file and the key."""

import re
from pathlib import Path

import pytest
import yaml

from strata import Config, ConfigError, load_config
from strata.config import AUNetConfig, config_to_dict, validate_config

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"
TINY = ROOT / "configs" / "tiny"
ALL_CONFIGS = sorted(PAPER.glob("*.yaml")) + sorted(TINY.glob("*.yaml"))
CONFIG_IDS = [f"{p.parent.name}/{p.stem}" for p in ALL_CONFIGS]
TRANSFORMER = TINY / "transformer.yaml"
MAMBA = TINY / "mamba2.yaml"
INTRA = TINY / "intra.yaml"


def config_error(path, overrides=None, data=None) -> str:
    """Load and expect a ConfigError; return its message after checking it is one line."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, data=data)
    message = str(info.value)
    assert message and "\n" not in message, message
    assert isinstance(info.value, ValueError)
    return message


# --- presets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=CONFIG_IDS)
def test_every_preset_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.description
    # An AU-Net is a list of stacks (its stages), every other model one stack.
    for stack in config.model.stages if isinstance(config.model, AUNetConfig) else [config.model]:
        assert isinstance(stack.layout, str) and stack.layout
        assert set(stack.layout) <= set("AWMGKH")
        assert stack.n_layers == len(stack.layout)
        if "A" in stack.layout or "W" in stack.layout:
            assert stack.attention.head_dim is not None  # resolved
        if "W" in stack.layout:
            assert stack.sliding_window is not None
        if "H" in stack.layout:
            assert stack.hybrid.attention.v_head_dim is not None  # resolved


# Table 8: layers, d_model, d_ffn, heads, kv, d_head / d_ssm, ssm head, d_state, conv
LLAMA = {
    "100m": (8, 1024, 3072, 16, 4, 64),
    "350m": (14, 1536, 4096, 24, 8, 64),
    "1b": (16, 2048, 8192, 32, 8, 64),
    "3b": (28, 3072, 8192, 32, 8, 96),
}
MAMBA2 = {
    "100m": (6, 1024, 3072, 16, 2048, 128, 128, 4),
    "350m": (11, 1536, 4096, 24, 3072, 128, 128, 4),
    "1b": (13, 2048, 8192, 32, 4096, 128, 128, 4),
    "3b": (21, 3072, 8192, 32, 6144, 192, 256, 4),
}
INTRA_D_SSM = {"100m": 1024, "350m": 1536, "1b": 2304, "3b": 3072}


@pytest.mark.parametrize("size", LLAMA)
def test_llama_presets_match_table_8(size):
    layers, d_model, d_ffn, heads, kv, d_head = LLAMA[size]
    model = load_config(PAPER / f"llama-{size}.yaml").model
    assert model.layout == "A" * layers
    assert (model.d_model, model.ffn.d_ffn, model.ffn.kind) == (d_model, d_ffn, "swiglu")
    assert (model.attention.n_heads, model.attention.n_kv_heads, model.attention.head_dim) == (heads, kv, d_head)
    assert model.vocab_size == 128256 and model.tie_embeddings and model.context_length == 8192
    rope = model.attention.rope
    assert rope.theta == 500_000
    scaling = rope.scaling
    assert (scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor, scaling.original_context) == (32, 1, 4, 8192)


@pytest.mark.parametrize("size", MAMBA2)
def test_mamba2_presets_match_table_8(size):
    layers, d_model, d_ffn, heads, d_ssm, ssm_head, d_state, conv = MAMBA2[size]
    model = load_config(PAPER / f"mamba2-{size}.yaml").model
    assert model.layout == "M" * layers
    assert (model.d_model, model.ffn.d_ffn) == (d_model, d_ffn)
    mamba = model.mamba
    assert (mamba.width(d_model), mamba.head_dim, mamba.d_state, mamba.conv_kernel) == (d_ssm, ssm_head, d_state, conv)
    assert mamba.width(d_model) == 2 * d_model  # expansion 2
    assert mamba.n_heads(d_model) == heads
    assert mamba.a_init_range == (0.01, 2.0)
    assert (mamba.dt_min, mamba.dt_max) == (1e-3, 1e-1)


@pytest.mark.parametrize("size", INTRA_D_SSM)
def test_intra_presets_follow_the_final_recipe(size):
    model = load_config(PAPER / f"intra-{size}.yaml").model
    hybrid = model.hybrid
    assert (hybrid.norm, hybrid.scale, hybrid.fusion, hybrid.share_value, hybrid.out_proj) == (
        "group",
        "none",
        "diff",
        False,
        "separate",
    )
    d_ssm = hybrid.mamba.width(model.d_model)
    assert d_ssm == INTRA_D_SSM[size]
    # 1:1 dimension split: attention Q/K dim == Mamba pre-expansion dim (d_ssm / 2)
    assert hybrid.attention.n_heads * hybrid.attention.head_dim == d_ssm // 2
    # values at full width so both branches produce d_ssm channels
    assert hybrid.attention.n_heads * hybrid.attention.value_head_dim == d_ssm
    assert model.layout.count("H") == {"100m": 1, "350m": 2, "1b": 2, "3b": 4}[size]  # 1:5


def test_intra_1b_branch_shapes():
    """Brief §5: Q/K dim 1152, d_ssm 2304, 16 attention + 16 SSM heads, 4 KV heads."""
    hybrid = load_config(PAPER / "intra-1b.yaml").model.hybrid
    assert hybrid.attention.n_heads * hybrid.attention.head_dim == 1152
    assert hybrid.mamba.d_ssm == 2304
    assert hybrid.attention.n_heads == 16 and hybrid.mamba.n_heads(2048) == 16
    assert hybrid.attention.n_kv_heads == 4


@pytest.mark.parametrize("size", ["100m", "350m", "1b", "3b"])
def test_swa_presets(size):
    model = load_config(PAPER / f"swa-{size}.yaml").model
    window = model.sliding_window
    assert (window.window, window.sinks, window.rope_theta) == (512, 64, 10_000)
    assert model.layout.count("W") > model.layout.count("A") >= 1


# --- overrides --------------------------------------------------------------------------------


def test_override_d_model():
    config = load_config(TRANSFORMER, ["model.d_model=256"])
    assert config.model.d_model == 256
    assert config.model.attention.head_dim == 64  # recomputed from the new width


def test_later_override_wins():
    assert load_config(TRANSFORMER, ["model.d_model=256", "model.d_model=512"]).model.d_model == 512


def test_override_creates_nested_sections():
    config = load_config(TRANSFORMER, ["model.sliding_window.window=32"])
    assert config.model.sliding_window.window == 32
    assert config.model.sliding_window.sinks == 64  # default filled in
    moe = load_config(TRANSFORMER, ["model.ffn.kind=moe", "model.ffn.moe.n_experts=4"]).model.ffn
    assert moe.kind == "moe" and moe.moe.n_experts == 4 and moe.moe.top_k == 1
    deep = load_config(TRANSFORMER, ["model.attention.rope.scaling.factor=8"]).model.attention.rope.scaling
    assert deep.factor == 8 and deep.original_context == 8192


def test_overrides_are_yaml_typed():
    config = load_config(
        MAMBA,
        [
            "model.tie_embeddings=false",
            "model.mamba.a_init_range=[0.01, 2.0]",
            "model.mamba.dt_min=1.0e-3",
            "model.norm_eps=1.0e-6",
            "model.mamba.d_state=16",
        ],
    )
    model = config.model
    assert model.tie_embeddings is False
    assert model.mamba.a_init_range == (0.01, 2.0)
    assert model.mamba.dt_min == 1e-3 and isinstance(model.mamba.dt_min, float)
    assert model.norm_eps == 1e-6
    assert model.mamba.d_state == 16 and isinstance(model.mamba.d_state, int)
    assert load_config(TRANSFORMER, ["model.tie_embeddings=false", "model.tie_embeddings=true"]).model.tie_embeddings is True


def test_override_a_init_range_changes_the_range():
    assert load_config(MAMBA, ["model.mamba.a_init_range=[1, 16]"]).model.mamba.a_init_range == (1.0, 16.0)


def test_override_value_may_contain_equals_and_spaces():
    assert load_config(TRANSFORMER, ["description=a = b"]).description == "a = b"


def test_override_a_mapping_value():
    config = load_config(INTRA, ["model.layout={layers: 13, ratio: '1:5', placement: scatter, special: H}"])
    assert config.model.layout == "MMMMHMMMHMMMM"


def test_overrides_do_not_mutate_the_input_data():
    data = yaml.safe_load(TRANSFORMER.read_text())
    before = yaml.safe_dump(data)
    config = load_config(data=data, overrides=["model.d_model=256", "model.ffn.moe.n_experts=4"])
    assert config.model.d_model == 256
    assert yaml.safe_dump(data) == before


def test_load_from_data_uses_a_placeholder_source_in_errors():
    message = config_error(None, ["model.foo=1"], data={"model": {"vocab_size": 3, "d_model": 8, "layout": "M"}})
    assert message.startswith("<config>: model.foo: unknown key")


def test_loads_are_independent():
    first = load_config(TRANSFORMER, ["model.d_model=256"])
    second = load_config(TRANSFORMER)
    assert first.model.attention.head_dim == 64
    assert second.model.attention.head_dim == 32


# --- layout given as a mapping ----------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, expected",
    [
        ("{layers: 13, ratio: '1:5', placement: middle}", "MMMAMMMAMMMMM"),
        ("{layers: 13}", "MMMAMMMAMMMMM"),  # defaults 1:5 middle A/M
        ("{layers: 13, ratio: '1:3', placement: cluster}", "MMMMMMMMAAAMM"),
        ("{layers: 13, placement: [1, 13]}", "AMMMMMMMMMMMA"),
        ("{layers: 6, ratio: '0:1'}", "MMMMMM"),
    ],
)
def test_layout_mapping_resolves_to_a_string(layout, expected):
    config = load_config(TINY / "inter.yaml", [f"model.layout={layout}"])
    assert config.model.layout == expected


def test_preset_mapping_layouts_are_strings():
    assert load_config(TINY / "swa.yaml").model.layout == "WAWW"
    assert load_config(INTRA).model.layout == "MMHMMM"


def test_layout_string_is_stripped():
    assert load_config(TRANSFORMER, ["model.layout=' AAAA '"]).model.layout == "AAAA"


# --- round trip -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=CONFIG_IDS)
def test_config_to_dict_round_trips(path):
    config = load_config(path)
    data = config_to_dict(config)
    assert all(isinstance(stack["layout"], str) for stack in data["model"].get("stages", [data["model"]]))
    again = validate_config(data)
    assert again == config
    assert config_to_dict(again) == data
    # and through YAML text, as a run directory would store it
    assert validate_config(yaml.safe_load(yaml.safe_dump(data))) == config


def test_config_to_dict_fills_defaults():
    data = config_to_dict(load_config(TRANSFORMER))
    assert data["model"]["attention"]["head_dim"] == 32
    assert data["model"]["norm_eps"] == 1e-5
    assert data["model"]["ffn"]["kind"] == "swiglu"


# --- errors -----------------------------------------------------------------------------------


def test_unknown_key():
    message = config_error(TRANSFORMER, ["model.foo=1"])
    assert str(TRANSFORMER) in message
    assert "model.foo" in message and "unknown key" in message
    assert message == f"{TRANSFORMER}: model.foo: unknown key"


@pytest.mark.parametrize("key", ["foo", "model.attention.rope.thta", "model.ffn.dffn", "model.layout_spec"])
def test_unknown_keys_at_any_depth(key):
    message = config_error(TRANSFORMER, [f"{key}=1"])
    assert message == f"{TRANSFORMER}: {key}: unknown key"


def test_unknown_key_in_layout_mapping():
    message = config_error(TRANSFORMER, ["model.layout={layers: 4, ratios: '1:3'}"])
    assert "model.layout.ratios" in message and "unknown key" in message


def test_wrong_type():
    message = config_error(TRANSFORMER, ["model.d_model=abc"])
    assert str(TRANSFORMER) in message
    assert "model.d_model" in message and "integer" in message and "'abc'" in message


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.tie_embeddings=maybe", "model.tie_embeddings"),
        ("model.attention.n_heads=[4]", "model.attention.n_heads"),
        ("model.norm_eps=-1.0", "model.norm_eps"),
        ("model.d_model=0", "model.d_model"),
        ("model.ffn.kind=relu", "model.ffn.kind"),
        ("model.context_length=1.5", "model.context_length"),
    ],
)
def test_other_bad_values(override, key):
    message = config_error(TRANSFORMER, [override])
    assert f"{TRANSFORMER}: {key}:" in message


def test_heads_must_divide_the_width():
    message = config_error(TRANSFORMER, ["model.attention.n_heads=6"])
    assert str(TRANSFORMER) in message
    assert "model.attention.n_heads" in message
    assert "6 does not divide d_model (128)" in message


def test_n_heads_must_be_a_multiple_of_n_kv_heads():
    message = config_error(TRANSFORMER, ["model.attention.n_kv_heads=3"])
    assert str(TRANSFORMER) in message
    assert "model.attention.n_heads" in message and "n_kv_heads (3)" in message


def test_mamba_head_dim_must_divide_d_ssm():
    message = config_error(MAMBA, ["model.mamba.head_dim=48"])
    assert str(MAMBA) in message
    assert "model.mamba.head_dim" in message and "d_ssm (256)" in message


def test_hybrid_mamba_head_dim_must_divide_its_d_ssm():
    message = config_error(INTRA, ["model.hybrid.mamba.head_dim=48"])
    assert "model.hybrid.mamba.head_dim" in message


def test_mamba_groups_must_divide_heads():
    message = config_error(MAMBA, ["model.mamba.n_groups=3"])
    assert "model.mamba.n_groups" in message


def test_odd_head_dim_is_rejected():
    message = config_error(TRANSFORMER, ["model.attention.head_dim=31"])
    assert "model.attention.head_dim" in message and "even" in message


def test_unknown_layout_symbol():
    message = config_error(TRANSFORMER, ["model.layout=AXM"])
    assert str(TRANSFORMER) in message
    assert "model.layout" in message and "'X'" in message and "block 2" in message


@pytest.mark.parametrize(
    "path, layout, section",
    [
        (TRANSFORMER, "AMA", "model.mamba"),
        (TRANSFORMER, "AHA", "model.hybrid"),
        (MAMBA, "MAM", "model.attention"),
        (MAMBA, "MWM", "model.attention"),
    ],
)
def test_missing_section(path, layout, section):
    message = config_error(path, [f"model.layout={layout}"])
    assert str(path) in message
    assert section in message and "missing" in message


def test_missing_required_key():
    data = {"model": {"vocab_size": 3, "layout": "M", "mamba": {}}}
    message = config_error(None, data=data)
    assert "model.d_model" in message and "required key is missing" in message


@pytest.mark.parametrize(
    "layout, text",
    [
        ("{layers: 13, placement: bogus}", "unknown placement 'bogus'"),
        ("{layers: 13, ratio: '1-5'}", "ratio must look like"),
        ("{layers: 13, ratio: '0:0'}", "0:0"),
        ("{layers: 0}", "model.layout.layers"),
        ("{layers: 13, placement: [0, 4]}", "outside"),
        ("[1, 2]", "layout must be a string"),
        ("''", "layout is empty"),
    ],
)
def test_bad_layout_mappings(layout, text):
    message = config_error(TINY / "inter.yaml", [f"model.layout={layout}"])
    assert "model.layout" in message and text in message


def test_concat_with_separate_is_rejected():
    message = config_error(INTRA, ["model.hybrid.fusion=concat"])
    assert "model.hybrid" in message and "concat" in message


def test_override_below_a_value():
    message = config_error(TRANSFORMER, ["model.d_model.x=1"])
    assert str(TRANSFORMER) in message and "model.d_model" in message


@pytest.mark.parametrize("override", ["model.d_model", "=3", "  =3", ""])
def test_bad_override_without_equals(override):
    message = config_error(TRANSFORMER, [override])
    assert "expected key.sub=value" in message
    assert repr(override) in message


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("description: ok\nmodel:\n  d_model: 128\n  layout: AAAA\n bad: 1\n")
    message = config_error(path)
    assert str(path) in message
    assert "line 5" in message and "YAML syntax error" in message


def test_yaml_syntax_error_in_flow_sequence(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  layout: [A, A\n  d_model: 3\n")
    message = config_error(path)
    assert "line 3" in message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = config_error(path)
    assert str(path) in message and "no such config file" in message


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("", "NoneType"), ("3\n", "int")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = tmp_path / "top.yaml"
    path.write_text(text)
    message = config_error(path)
    assert str(path) in message and "top level must be a mapping" in message and kind in message


def test_load_config_needs_a_path_or_data():
    with pytest.raises(ConfigError, match="needs a path or data"):
        load_config()


def test_directory_path_is_a_config_error(tmp_path):
    config_error(tmp_path)


def test_duplicate_keys_are_rejected(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(TRANSFORMER.read_text() + "\n  d_model: 256\n")
    config_error(path)


def test_override_a_list_item_by_index():
    config = load_config(TINY / "aunet3.yaml", ["model.stages.1.d_model=96", "model.stages.2.max_length=64"])
    assert config.model.stages[1].d_model == 96 and config.model.stages[2].max_length == 64


@pytest.mark.parametrize("key", ["model.stages.3.d_model", "model.stages.x.d_model", "model.stages.-1.d_model"])
def test_override_a_list_item_out_of_range_names_the_key(key):
    with pytest.raises(ConfigError, match=rf"{re.escape(key.rsplit('.', 1)[0])}: model.stages is a list of 3; use an index 0..2"):
        load_config(TINY / "aunet3.yaml", [f"{key}=8"])

"""Hugging Face model directories read lazily, and meta-built models filled from them: the same
logits as the saved model from every file layout, dtype conversion, one-line errors naming the
file or the tensor, and a peak below 1.3x the filled model's size."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from strata import build_model, load_config
from strata.interop.weights import (
    CheckpointTensors,
    WeightsError,
    materialize,
    model_nbytes,
    open_checkpoint_tensors,
)

ROOT = Path(__file__).resolve().parents[1]
INTER = ROOT / "configs" / "tiny" / "inter.yaml"
TRANSFORMER = ROOT / "configs" / "tiny" / "transformer.yaml"
MOE = ROOT / "configs" / "tiny" / "intra-moe.yaml"


def save_single(directory: Path, state: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(directory / "model.safetensors"))


def save_bin(directory: Path, state: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({name: tensor.clone() for name, tensor in state.items()}, directory / "pytorch_model.bin")


def save_shards(directory: Path, state: dict[str, torch.Tensor], kind: str) -> None:
    """Two shards, alternate tensors in each, and the index Hugging Face writes beside them."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(state)
    stem, suffix, index = (("model", "safetensors", "model.safetensors.index.json") if kind == "safetensors"
                           else ("pytorch_model", "bin", "pytorch_model.bin.index.json"))
    shards = {f"{stem}-00001-of-00002.{suffix}": names[::2], f"{stem}-00002-of-00002.{suffix}": names[1::2]}
    for file, shard_names in shards.items():
        shard = {name: state[name].clone() for name in shard_names}
        if kind == "safetensors":
            save_file(shard, str(directory / file))
        else:
            torch.save(shard, directory / file)
    weight_map = {name: file for file, shard_names in shards.items() for name in shard_names}
    metadata = {"total_size": sum(t.numel() * t.element_size() for t in state.values())}
    (directory / index).write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}))


def save_sharded(directory: Path, state: dict[str, torch.Tensor]) -> None:
    save_shards(directory, state, "safetensors")


def save_sharded_bin(directory: Path, state: dict[str, torch.Tensor]) -> None:
    save_shards(directory, state, "bin")


SAVERS = {"safetensors": save_single, "sharded": save_sharded, "bin": save_bin, "sharded-bin": save_sharded_bin}


def load(directory: Path, config, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, CheckpointTensors]:
    tensors = open_checkpoint_tensors(directory)
    model = build_model(config, device="meta")
    materialize(model, ((name, tensors[name]) for name in tensors.names()), dtype, str(directory))
    return model, tensors


def built(path: Path, overrides: list[str] | None = None, seed: int = 0):
    config = load_config(path, overrides).model
    torch.manual_seed(seed)
    return config, build_model(config).eval()


def assert_same_logits(model: nn.Module, expected: nn.Module, vocab: int) -> None:
    tokens = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens), expected(tokens))


def assert_on_cpu(model: nn.Module) -> None:
    tensors = list(model.parameters()) + list(model.buffers())
    assert not any(tensor.is_meta for tensor in tensors)


@pytest.mark.parametrize("layout", SAVERS)
@pytest.mark.parametrize("tie", ["true", "false"])
def test_every_layout_gives_the_saved_models_logits(tmp_path, layout, tie):
    config, original = built(INTER, [f"model.tie_embeddings={tie}"])
    SAVERS[layout](tmp_path, original.state_dict())
    model, tensors = load(tmp_path, config)
    assert_on_cpu(model)
    assert_same_logits(model, original, config.vocab_size)
    assert tensors.unread() == []
    assert (model.head is None) == (tie == "true")
    # The computed buffer is what construction computes.
    assert torch.equal(model.blocks[2].mixer.rotary.inv_freq, original.blocks[2].mixer.rotary.inv_freq)


def test_tied_embeddings(tmp_path):
    config, original = built(TRANSFORMER, ["model.tie_embeddings=true"])
    state = original.state_dict()
    assert "head.weight" not in state  # strata ties by using embed.weight as the head
    save_single(tmp_path, state)
    model, _ = load(tmp_path, config)
    assert model.head is None
    assert_same_logits(model, original, config.vocab_size)


def test_parameters_of_one_tensor_stay_one_parameter():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(3, 4, bias=False)
            self.second = nn.Linear(3, 4, bias=False)
            self.second.weight = self.first.weight

    with torch.device("meta"):
        model = Tied()
    weight = torch.randn(4, 3)
    materialize(model, [("second.weight", weight)], torch.float32, "tied")
    assert model.first.weight is model.second.weight
    assert torch.equal(model.first.weight, weight)
    assert model_nbytes(model, torch.float32) == weight.numel() * 4


def test_moe_balance_bias_is_loaded_and_its_counter_starts_at_zero(tmp_path):
    config, original = built(MOE)
    for name, buffer in original.named_buffers():
        if name.endswith("balance_bias"):
            buffer.copy_(torch.randn(buffer.shape))
    save_single(tmp_path, original.state_dict())
    model, tensors = load(tmp_path, config)
    assert tensors.unread() == []
    buffers = dict(model.named_buffers())
    assert all(torch.equal(buffers[name], value) for name, value in original.state_dict().items() if name in buffers)
    counters = [value for name, value in buffers.items() if name.endswith("tokens_per_expert")]
    assert counters and all(torch.equal(counter, torch.zeros_like(counter)) for counter in counters)
    assert_same_logits(model, original, config.vocab_size)


def test_a_bf16_checkpoint_is_read_as_float32(tmp_path):
    config, original = built(INTER)
    state = {name: tensor.bfloat16() for name, tensor in original.state_dict().items()}
    save_single(tmp_path, state)
    tensors = open_checkpoint_tensors(tmp_path)
    assert tensors.dtype("embed.weight") == torch.bfloat16
    assert tensors.shape("embed.weight") == (config.vocab_size, config.d_model)
    assert "embed.weight" in tensors and "nothing" not in tensors and tensors.get("nothing") is None
    assert tensors.unread() == sorted(state)  # names, shapes and dtypes read no tensor
    model, _ = load(tmp_path, config)
    assert all(param.dtype == torch.float32 for param in model.parameters())
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], tensor.float()) for name, tensor in state.items())
    assert model.blocks[2].mixer.rotary.inv_freq.dtype == torch.float32


def test_a_checkpoint_read_as_bf16(tmp_path):
    config, original = built(INTER)
    save_single(tmp_path, original.state_dict())
    model, _ = load(tmp_path, config, torch.bfloat16)
    assert all(param.dtype == torch.bfloat16 for param in model.parameters())
    assert model.blocks[2].mixer.rotary.inv_freq.dtype == torch.float32  # RoPE computes in float32
    assert model_nbytes(model, torch.bfloat16) * 2 == model_nbytes(original, torch.float32)


def assert_error(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture
def inter_state():
    config, original = built(INTER)
    return config, original.state_dict()


def test_a_missing_weight(tmp_path, inter_state):
    config, state = inter_state
    save_single(tmp_path, {name: tensor for name, tensor in state.items() if name != "norm.weight"})
    with pytest.raises(WeightsError) as error:
        load(tmp_path, config)
    assert_error(error, f"{tmp_path}: no weight for norm.weight")
    assert "more" not in str(error.value)


def test_several_missing_weights(tmp_path, inter_state):
    config, state = inter_state
    save_single(tmp_path, {name: tensor for name, tensor in state.items() if not name.startswith("blocks.0.")})
    with pytest.raises(WeightsError) as error:
        load(tmp_path, config)
    count = sum(name.startswith("blocks.0.") for name in state)
    assert_error(error, "no weight for blocks.0.", f"(and {count - 1} more)")


def test_an_unexpected_weight(tmp_path, inter_state):
    config, state = inter_state
    save_single(tmp_path, state | {"extra.weight": torch.zeros(3)})
    with pytest.raises(WeightsError) as error:
        load(tmp_path, config)
    assert_error(error, f"{tmp_path}: unexpected weight extra.weight")
    # A caller that takes only the model's names learns of the extra one from unread().
    tensors = open_checkpoint_tensors(tmp_path)
    model = build_model(config, device="meta")
    materialize(model, ((name, tensors[name]) for name in state), torch.float32, str(tmp_path))
    assert tensors.unread() == ["extra.weight"]


def test_a_wrong_shape(tmp_path, inter_state):
    config, state = inter_state
    save_single(tmp_path, state | {"embed.weight": torch.zeros(10, config.d_model)})
    with pytest.raises(WeightsError) as error:
        load(tmp_path, config)
    assert_error(error, f"embed.weight has shape (10, {config.d_model}) in the checkpoint, "
                        f"the model expects ({config.vocab_size}, {config.d_model})")


def test_no_directory_or_no_weights(tmp_path):
    with pytest.raises(WeightsError) as error:
        open_checkpoint_tensors(tmp_path / "absent")
    assert_error(error, str(tmp_path / "absent"), "no such directory")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError) as error:
        open_checkpoint_tensors(tmp_path)
    assert_error(error, f"{tmp_path}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin")


def test_a_corrupt_safetensors_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x07not a safetensors file" * 50)
    with pytest.raises(WeightsError) as error:
        open_checkpoint_tensors(tmp_path)
    assert_error(error, str(tmp_path / "model.safetensors"), "not a readable safetensors file")


class NotATensor:
    pass


def test_a_bin_with_pickled_objects_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2), "x": NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError) as error:
        open_checkpoint_tensors(tmp_path)
    assert_error(error, str(tmp_path / "pytorch_model.bin"), "refused: it holds pickled objects other than tensors")


def test_a_corrupt_bin(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x07garbage" * 50)
    with pytest.raises(WeightsError) as error:
        open_checkpoint_tensors(tmp_path)
    assert_error(error, str(tmp_path / "pytorch_model.bin"), "not a zip-format torch.save file")


def test_an_index_naming_a_missing_shard(tmp_path, inter_state):
    _, state = inter_state
    save_sharded(tmp_path, state)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError) as error:
        open_checkpoint_tensors(tmp_path)
    assert_error(error, str(tmp_path / "model.safetensors.index.json"), "model-00002-of-00002.safetensors")


@pytest.mark.parametrize("saver", [save_sharded, save_sharded_bin])
def test_an_index_placing_a_tensor_in_a_shard_that_lacks_it(tmp_path, inter_state, saver):
    _, state = inter_state
    saver(tmp_path, state)
    index = next(tmp_path.glob("*.index.json"))
    data = json.loads(index.read_text())
    shard = data["weight_map"]["norm.weight"]
    data["weight_map"]["ghost.weight"] = shard
    index.write_text(json.dumps(data))
    tensors = open_checkpoint_tensors(tmp_path)
    assert "ghost.weight" in tensors
    with pytest.raises(WeightsError) as error:
        tensors["ghost.weight"]
    assert_error(error, f"{tmp_path / shard}: no tensor ghost.weight")


MEMORY_OVERRIDES = ["model.d_model=1024", "model.ffn.d_ffn=2816", "model.attention.n_heads=8",
                    "model.attention.n_kv_heads=8", "model.layout=AAA"]


def test_filling_peaks_below_1_3x_the_model(tmp_path):
    """Peak RSS of a fresh process that opens a bf16 checkpoint of a 148 MiB (fp32) model and
    fills a meta build with it in fp32, over its RSS before: the model once, plus about one
    checkpoint tensor, not the model plus the checkpoint."""
    config = load_config(TRANSFORMER, MEMORY_OVERRIDES).model
    meta = build_model(config, device="meta")
    save_single(tmp_path, {name: torch.randn(tensor.shape, dtype=torch.bfloat16)
                           for name, tensor in meta.state_dict().items()})
    # VmHWM, the peak of the child's own memory map (see tests/test_meta_init.py). Nothing is
    # imported after the baseline.
    script = (
        "import re\n"
        "import torch\n"
        "from strata import build_model, load_config\n"
        "from strata.interop.weights import materialize, model_nbytes, open_checkpoint_tensors\n"
        "def kib(field):\n"
        "    return int(re.search(field + r':\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
        f"model = build_model(load_config({str(TRANSFORMER)!r}, {MEMORY_OVERRIDES!r}), device='meta')\n"
        "baseline = kib('VmRSS')\n"
        f"tensors = open_checkpoint_tensors({str(tmp_path)!r})\n"
        f"materialize(model, ((n, tensors[n]) for n in tensors.names()), torch.float32, {str(tmp_path)!r})\n"
        "peak = kib('VmHWM')\n"
        "assert all(p.dtype == torch.float32 and not p.is_meta for p in model.parameters())\n"
        "print(baseline, peak, model_nbytes(model, torch.float32))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    baseline_kib, peak_kib, nbytes = map(int, result.stdout.split())
    growth = (peak_kib - baseline_kib) * 1024
    print(f"model {nbytes / 2**20:.0f} MiB fp32: peak - baseline {growth / 2**20:.0f} MiB ({growth / nbytes:.2f}x)")
    assert nbytes > 140 * 2**20
    assert growth < 1.3 * nbytes

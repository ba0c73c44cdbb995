"""A Hugging Face model directory's weights, read lazily, and a meta-built model filled with them.

``open_checkpoint_tensors(directory)`` finds the weights in the order Hugging Face prefers them:

    model.safetensors                 one file
    model.safetensors.index.json      shards; its ``weight_map`` names the file of each tensor
    pytorch_model.bin                 one torch.save file (tensors only: loaded with weights_only)
    pytorch_model.bin.index.json      shards of those

and reads a tensor only when it is asked for. ``materialize(model, tensors, dtype, source)`` fills
a model built with ``build_model(config, device="meta")`` one tensor at a time, copying each into
memory of its own in ``dtype`` as it comes, so that loading never holds the whole model twice:
from safetensors the process peaks at the model's size in ``dtype`` plus about one checkpoint
tensor (tests/test_interop_weights.py holds the peak below 1.3x the model's size). A torch.save
file is mapped whole, and the pages of it already read stay counted as the process's memory
until its last tensor has been read (clean file pages, which the kernel can reclaim): filling
from ``pytorch_model.bin`` peaks at the model plus the file.

Only torch and safetensors are needed, not ``transformers``. Anything wrong with the directory,
its files or their fit to the model is a one-line WeightsError naming the file or the tensor.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from strata.nn.rope import RotaryEmbedding

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# safetensors' dtype codes (``get_slice(name).get_dtype()``) of the dtypes torch has.
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit the model; the one-line message names the file
    or the tensor and says what is wrong."""


def _reason(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class _SafetensorsReader:
    """safetensors files: headers kept open for names, shapes and dtypes; data read per tensor."""

    def __init__(self):
        self._headers: dict[Path, tuple[object, set[str]]] = {}

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as error:
            raise WeightsError(f"{path}: not a readable safetensors file ({_reason(error)})") from None

    def _header(self, path: Path, name: str | None = None):
        if path not in self._headers:
            handle = self._open(path)
            self._headers[path] = handle, set(handle.keys())
        handle, names = self._headers[path]
        if name is not None and name not in names:
            raise WeightsError(f"{path}: no tensor {name}, which the index places there")
        return handle

    def names(self, path: Path) -> list[str]:
        return list(self._header(path).keys())

    def shape(self, path: Path, name: str) -> torch.Size:
        return torch.Size(self._header(path, name).get_slice(name).get_shape())

    def dtype(self, path: Path, name: str) -> torch.dtype:
        code = self._header(path, name).get_slice(name).get_dtype()
        return _SAFETENSORS_DTYPES[code] if code in _SAFETENSORS_DTYPES else self.read(path, name).dtype

    def read(self, path: Path, name: str) -> torch.Tensor:
        self._header(path, name)
        # A handle of its own: safe_open maps the file, the pages a read touches count as this
        # process's memory until the mapping goes, and the tensor may keep its handle's mapping.
        # With one handle per read that mapping goes with the tensor; through one long-lived
        # handle, filling an fp32 model from a bf16 checkpoint peaked at 1.5x the model, not 1.04x.
        with self._open(path) as handle:
            try:
                return handle.get_tensor(name)
            except SafetensorError as error:
                raise WeightsError(f"{path}: cannot read {name} ({_reason(error)})") from None

    def release(self, path: Path) -> None:
        """Nothing to let go: each tensor's mapping goes with the tensor."""


class _PickledReader:
    """torch.save files, one at a time: each is loaded (mapped, not read) when a tensor of it is
    asked for and kept until another file is, or until all its tensors have been read."""

    def __init__(self):
        self._loaded: tuple[Path, dict[str, torch.Tensor]] | None = None

    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        if self._loaded is None or self._loaded[0] != path:
            self._loaded = None  # the previous file goes before the next is mapped
            self._loaded = path, _torch_load(path)
        return self._loaded[1]

    def _tensor(self, path: Path, name: str) -> torch.Tensor:
        tensors = self._load(path)
        if name not in tensors:
            raise WeightsError(f"{path}: no tensor {name}, which the index places there")
        return tensors[name]

    def names(self, path: Path) -> list[str]:
        return list(self._load(path))

    def shape(self, path: Path, name: str) -> torch.Size:
        return self._tensor(path, name).shape

    def dtype(self, path: Path, name: str) -> torch.dtype:
        return self._tensor(path, name).dtype

    def read(self, path: Path, name: str) -> torch.Tensor:
        return self._tensor(path, name)

    def release(self, path: Path) -> None:
        if self._loaded is not None and self._loaded[0] == path:
            self._loaded = None


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    # mmap needs the zip format torch.save has written since torch 1.6; a file in the older format
    # would have to be read whole.
    if not zipfile.is_zipfile(path):
        raise WeightsError(f"{path}: not a zip-format torch.save file (corrupt, or older than torch 1.6)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise WeightsError(f"{path}: refused: it holds pickled objects other than tensors") from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise WeightsError(f"{path}: not a readable torch.save file ({_reason(error)})") from None
    if not isinstance(loaded, dict):
        raise WeightsError(f"{path}: holds a {type(loaded).__name__}, not a dict of tensors")
    for name, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: {name} is a {type(value).__name__}, not a tensor")
    return loaded


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors by name, read from disk only when one is asked for
    (``tensors[name]``, ``tensors.get(name)``); names, shapes and dtypes come from the headers.

    ``unread()`` names the tensors nobody has asked for: after filling a model from ``names()``
    it is empty unless the checkpoint holds weights the model has no place for.
    """

    def __init__(self, directory: Path, locations: dict[str, Path], reader: _SafetensorsReader | _PickledReader):
        self.directory = directory
        self._locations = locations
        self._reader = reader
        self._unread = set(locations)
        self._unread_per_file = Counter(locations.values())

    def names(self) -> list[str]:
        """Every tensor's name, those of one file together (so that reading them in this order
        holds one torch.save shard at a time)."""
        return list(self._locations)

    def _file(self, name: str) -> Path:
        if name not in self._locations:
            raise KeyError(name)
        return self._locations[name]

    def shape(self, name: str) -> torch.Size:
        return self._reader.shape(self._file(name), name)

    def dtype(self, name: str) -> torch.dtype:
        return self._reader.dtype(self._file(name), name)

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._file(name)
        tensor = self._reader.read(path, name)
        if name in self._unread:
            self._unread.discard(name)
            self._unread_per_file[path] -= 1
            if self._unread_per_file[path] == 0:
                self._reader.release(path)
        return tensor

    def __contains__(self, name: object) -> bool:
        return name in self._locations

    def __iter__(self) -> Iterator[str]:
        return iter(self._locations)

    def __len__(self) -> int:
        return len(self._locations)

    def unread(self) -> list[str]:
        return sorted(self._unread)


def open_checkpoint_tensors(directory: Path) -> CheckpointTensors:
    """The tensors of the Hugging Face model directory ``directory`` (see the module docstring
    for the files it looks for, in order); nothing but headers and indexes is read yet."""
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsError(f"{directory}: no such directory")
    for single, index, reader in ((SAFETENSORS, SAFETENSORS_INDEX, _SafetensorsReader()),
                                  (BIN, BIN_INDEX, _PickledReader())):
        if (directory / single).is_file():
            path = directory / single
            return CheckpointTensors(directory, {name: path for name in reader.names(path)}, reader)
        if (directory / index).is_file():
            return CheckpointTensors(directory, _sharded_locations(directory / index), reader)
    raise WeightsError(f"{directory}: no {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or {BIN_INDEX}")


def _sharded_locations(index: Path) -> dict[str, Path]:
    """The file of each tensor an index names, those of one shard together."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WeightsError(f"{index}: not a readable index ({_reason(error)})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{index}: weight_map is not a mapping of tensor names to file names")
    order = {shard: rank for rank, shard in enumerate(dict.fromkeys(weight_map.values()))}
    for shard in order:
        if not (index.parent / shard).is_file():
            raise WeightsError(f"{index}: its shard {shard} does not exist")
    return {name: index.parent / shard for name, shard in sorted(weight_map.items(), key=lambda item: order[item[1]])}


@dataclass
class _Slot:
    """A persistent parameter or buffer of a meta model, under every name it has (tied ones)."""

    names: list[str]
    owners: list[tuple[nn.Module, str]]
    meta: torch.Tensor
    is_parameter: bool
    filled: bool = False


def _slots(model: nn.Module) -> dict[str, _Slot]:
    """Each dotted state-dict name of ``model``'s persistent parameters and buffers; names of one
    tensor (tied parameters, a module reached by two paths) share a slot."""
    slots: dict[str, _Slot] = {}
    by_tensor: dict[int, _Slot] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        persistent_buffers = ((attr, tensor, False) for attr, tensor in module._buffers.items()
                              if attr not in module._non_persistent_buffers_set)
        own = chain(((attr, tensor, True) for attr, tensor in module._parameters.items()), persistent_buffers)
        for attr, tensor, is_parameter in own:
            if tensor is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            if not tensor.is_meta:
                raise ValueError(f"materialize needs a model built on the meta device; {name} is on {tensor.device}")
            slot = by_tensor.setdefault(id(tensor), _Slot([], [], tensor, is_parameter))
            slot.names.append(name)
            slot.owners.append((module, attr))
            slots[name] = slot
    return slots


def _fill(slot: _Slot, name: str, tensor: torch.Tensor, dtype: torch.dtype, source: str) -> None:
    meta = slot.meta
    if tensor.shape != meta.shape:
        raise WeightsError(f"{source}: {name} has shape {tuple(tensor.shape)} in the checkpoint, "
                           f"the model expects {tuple(meta.shape)}")
    # A copy even in the same dtype: the checkpoint's tensor may be a view of its file, mapped
    # (safe_open's get_tensor, torch.load's mmap), and a model backed by that file would fault
    # once the file was rewritten in place (saving back to the same directory).
    value = tensor.to(device="cpu", dtype=dtype if meta.is_floating_point() else meta.dtype, copy=True)
    if slot.is_parameter:
        value = nn.Parameter(value, requires_grad=meta.requires_grad)
    for module, attr in slot.owners:
        (module._parameters if slot.is_parameter else module._buffers)[attr] = value
    slot.filled = True


def materialize(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype, source: str) -> None:
    """Fill ``model``, built on the meta device, with ``tensors`` (name, tensor) pairs, on the
    CPU, floating ones converted to ``dtype``; ``source`` (the checkpoint) begins error messages.

    Each tensor replaces its meta parameter or buffer as it comes, before the next is taken from
    ``tensors``, so the model is never allocated twice and a lazy ``tensors`` holds one
    checkpoint tensor at a time. Tied parameters stay one Parameter. Non-persistent buffers,
    which checkpoints do not hold, are then computed (``_fill_non_persistent``). A WeightsError
    (a weight the model lacks, a shape that differs, a weight missing) leaves the model unusable.
    """
    slots = _slots(model)
    with torch.no_grad():
        for name, tensor in tensors:
            if name not in slots:
                raise WeightsError(f"{source}: unexpected weight {name}")
            _fill(slots[name], name, tensor, dtype, source)
            del tensor  # the checkpoint's copy goes before the next is read
    missing = list(dict.fromkeys(slot.names[0] for slot in slots.values() if not slot.filled))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{source}: no weight for {missing[0]}{more}")
    _fill_non_persistent(model)


def _fill_non_persistent(model: nn.Module) -> None:
    """Allocate the non-persistent buffers still on meta, on the CPU, and compute them."""
    with torch.no_grad():
        for module in model.modules():
            names = [attr for attr in module._non_persistent_buffers_set
                     if module._buffers.get(attr) is not None and module._buffers[attr].is_meta]
            for attr in names:
                meta = module._buffers[attr]
                module._buffers[attr] = torch.empty(meta.shape, dtype=meta.dtype)
            if names:
                _reset_non_persistent(module, names)


def _reset_non_persistent(module: nn.Module, names: list[str]) -> None:
    # Not each module's reset_parameters: it may also re-initialise what was just loaded (MoE's
    # zeroes the persistent balance_bias). RoPE's touches only its frequencies and their tables;
    # strata's other non-persistent buffers are counters (MoE's tokens_per_expert), which start at zero.
    if isinstance(module, RotaryEmbedding):
        module.reset_parameters()
    else:
        for attr in names:
            module._buffers[attr].zero_()


def model_nbytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of ``model``'s parameters and buffers with the floating ones in ``dtype`` (tied
    parameters counted once); meta models included."""
    return sum(tensor.numel() * (dtype.itemsize if tensor.is_floating_point() else tensor.dtype.itemsize)
               for tensor in chain(model.parameters(), model.buffers()))

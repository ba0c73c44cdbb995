"""Hugging Face model directories in and out.

``load_hf(PATH)`` reads a Hugging Face model directory (``config.json`` plus ``*.safetensors`` or
``pytorch_model.bin``) or a mamba_ssm directory (``config.json`` with ``d_model``, ``n_layer``,
``ssm_cfg``) of a known family, and returns the model, its tokenizer (None when the directory
has none) and a strata ``Config`` whose ``model`` section describes it, so ``strata info`` prints
its layout and costs like any config. (``strata.from_pretrained`` opens these and strata's own
runs alike.) ``save_hf`` writes a strata model as the HF family that expresses its layout.

An imported model is built on the meta device and filled tensor by tensor as the checkpoint is
read (``strata.interop.weights``): loading peaks near the model's own size. Floating weights
take ``dtype``; by default float32 on a CPU (bf16 is far slower there) and the checkpoint's own
dtype elsewhere.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from strata.config import Config, ConfigError, ModelConfig, validate_config
from strata.data.tokenizer import FILE_NAME as TOKENIZER_FILE
from strata.data.tokenizer import HFTokenizer, Tokenizer, load_hf_tokenizer
from strata.interop import bamba, falcon_h1, granite_hybrid, llama, mamba2, nemotron_h, olmo_hybrid, qwen3_next
from strata.interop.family import Family, UnsupportedCheckpoint
from strata.interop.weights import materialize, open_checkpoint_tensors
from strata.models import build_model

# Export tries the families in this order and takes the first that expresses the layout.
FAMILIES: tuple[Family, ...] = (llama.FAMILY, mamba2.FAMILY, bamba.FAMILY, granite_hybrid.FAMILY,
                                nemotron_h.FAMILY, falcon_h1.FAMILY, qwen3_next.FAMILY, olmo_hybrid.FAMILY)
# Families strata reads but does not write (a model of theirs exports as a family above).
IMPORT_ONLY: tuple[Family, ...] = qwen3_next.QWEN3_5_FAMILIES
# Block options younger than most families: a family exports a model using one only if it is
# listed here as expressing it (the others' ``exportable`` predates the option, and their export
# would drop its weights or change what it computes).
OPTIONS_EXPRESSED: dict[str, set[str]] = {
    qwen3_next.FAMILY.architecture: {"attention.output_gate", "attention.qk_norm", "ffn.moe.softmax_over",
                                     "ffn.moe.shared_gate"},
    olmo_hybrid.FAMILY.architecture: {"attention.qk_norm", "post_norm"},
}
MAMBA_SSM_KEYS = ("d_model", "n_layer", "ssm_cfg")
# Names a checkpoint may hold that are not weights: RoPE tables some older exports saved.
NOT_WEIGHTS = ("rotary_emb.inv_freq",)
# Multi-token prediction layers that Qwen3-Next and OLMo Hybrid checkpoints carry beside the model,
# which transformers drops as well.
NOT_MODEL = ("mtp.",)
# A checkpoint with tied embeddings may still carry the head, a copy of the embedding.
TIED_HEAD = "lm_head.weight"


class PretrainedError(ValueError):
    """A directory strata cannot load or write; ``str()`` is one line naming it."""


@dataclass
class HFModel:
    model: nn.Module
    tokenizer: Tokenizer | None
    config: Config
    family: str  # the HF architecture it was imported as


def is_hf_directory(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "config.yaml").is_file()


def read_hf_config(path: Path) -> tuple[Family, object, Config]:
    """The family of the HF (or mamba_ssm) directory ``path``, its config object, and the strata
    config that describes the same model; nothing is read but config.json."""
    raw = _read_json(path / "config.json")
    if all(key in raw for key in MAMBA_SSM_KEYS):
        family = mamba2.MAMBA_SSM
        hf_config = mamba2.read_mamba_ssm_config(raw)
    else:
        family = _family_of(raw, path / "config.json")
        hf_config = _transformers_config(path)
    try:
        section = family.config_to_strata(hf_config)
    except UnsupportedCheckpoint as error:
        raise PretrainedError(f"{path / 'config.json'}: {error}") from None
    data = {"model": section}
    if (path / TOKENIZER_FILE).is_file():
        data["data"] = {"tokenizer": {"kind": "hf", "path": str(path)}}
    try:
        config = validate_config(data, str(path / "config.json"))
    except ConfigError as error:  # a combination strata's own checks refuse
        raise PretrainedError(f"{error} (translated from {family.architecture})") from None
    config.description = f"{family.architecture} from {path}"
    return family, hf_config, config


def load_hf(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> HFModel:
    """The model (in eval mode), tokenizer and config of the HF or mamba_ssm directory ``path``."""
    path, device = Path(path).expanduser(), torch.device(device)
    family, hf_config, config = read_hf_config(path)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else _checkpoint_dtype(hf_config)
    tensors = open_checkpoint_tensors(path)
    model = build_model(config, device="meta")
    materialize(model, family.weights_to_strata(config.model, tensors), dtype, str(path))
    unread = [name for name in tensors.unread() if not name.endswith(NOT_WEIGHTS)
              and not name.startswith(NOT_MODEL + family.ignored) and not (config.model.tie_embeddings and name == TIED_HEAD)]
    if unread:
        raise PretrainedError(f"{path}: weight {unread[0]} has no place in the {family.architecture} strata builds"
                              + (f" (and {len(unread) - 1} more)" if len(unread) > 1 else ""))
    tokenizer = load_hf_tokenizer(path) if (path / TOKENIZER_FILE).is_file() else None
    return HFModel(model.to(device).eval(), tokenizer, config, family.architecture)


def _family_of(raw: dict, where: Path) -> Family:
    architectures = raw.get("architectures") or []
    for family in (*FAMILIES, *IMPORT_ONLY, mamba2.MAMBA_SSM):
        if family.architecture in architectures or (not architectures and raw.get("model_type") == family.model_type):
            return family
    named = ", ".join(architectures) or raw.get("model_type") or "nothing"
    known = ", ".join(family.architecture for family in (*FAMILIES, *IMPORT_ONLY))
    raise PretrainedError(f"{where}: architectures names {named}; strata loads {known} and mamba_ssm directories")


def _transformers_config(path: Path):
    try:
        from transformers import AutoConfig
    except ImportError:
        raise PretrainedError(f"{path}: reading a Hugging Face config needs transformers (pip install 'strata[hf]')") from None
    try:
        return AutoConfig.from_pretrained(str(path))
    except (ValueError, OSError, TypeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PretrainedError(f"{path / 'config.json'}: transformers cannot read it ({reason})") from None


def _checkpoint_dtype(hf_config) -> torch.dtype:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PretrainedError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(data, dict):
        raise PretrainedError(f"{path}: not a config (top level is not an object)")
    return data


# --- export --------------------------------------------------------------------------------------


def hf_family(config: ModelConfig) -> Family:
    """The first HF family that expresses the model ``config`` exactly; PretrainedError says why none does."""
    if not isinstance(config, ModelConfig):
        raise PretrainedError("an AU-Net has no Hugging Face counterpart to export to")
    used = _options_used(config)
    reasons = []
    for family in FAMILIES:
        unexpressed = sorted(used - OPTIONS_EXPRESSED.get(family.architecture, set()))
        reason = f"it cannot express {unexpressed[0]}" if unexpressed else family.exportable(config)
        if reason is None:
            return family
        reasons.append(f"{family.architecture}: {reason}")
    raise PretrainedError(f"layout {config.layout} maps onto no Hugging Face family ({'; '.join(reasons)})")


def _options_used(config: ModelConfig) -> set[str]:
    """The keys of ``OPTIONS_EXPRESSED``'s options that ``config`` sets."""
    used = set()
    for section in (config.attention, config.hybrid.attention if config.hybrid is not None else None):
        if section is not None and section.output_gate:
            used.add("attention.output_gate")
        if section is not None and section.qk_norm != "none":
            used.add("attention.qk_norm")
    if set(config.post_norm) & set(config.layout):
        used.add("post_norm")
    moe = config.ffn.moe if config.ffn.kind == "moe" else None
    if moe is not None and moe.softmax_over != "chosen":
        used.add("ffn.moe.softmax_over")
    if moe is not None and moe.shared_gate:
        used.add("ffn.moe.shared_gate")
    return used


def hf_state(model: nn.Module, family: Family) -> dict[str, torch.Tensor]:
    """``model``'s weights under ``family``'s HF names, each a tensor of its own (safetensors
    refuses tensors that share memory, as the q/k/v views of one projection would)."""
    state = family.weights_to_hf(model.config, model.state_dict())
    return {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}


def hf_config_object(config: ModelConfig, family: Family):
    """The transformers config of ``family`` for the model ``config``."""
    hf_config = family.config_class()(**family.config_to_hf(config))
    hf_config.architectures = [family.architecture]
    return hf_config


def to_hf_model(model: nn.Module):
    """A transformers model computing what the strata ``model`` computes (weights copied), of the
    first family that expresses its layout; the peer tests and benchmarks compare the two. It goes
    through a saved directory, as a user's export would, so transformers' own loading (its renames
    of checkpoint names, its tying of embeddings) applies."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        out = save_hf(model, None, Path(folder) / "hf")
        return AutoModelForCausalLM.from_pretrained(str(out), dtype=next(model.parameters()).dtype).eval()


def save_hf(model: nn.Module, tokenizer: Tokenizer | None, out: str | Path) -> Path:
    """Write the strata ``model`` as a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained``
    loads without custom code: config.json, model.safetensors and the tokenizer when it is a
    Hugging Face one (a byte tokenizer has no tokenizer.json to give). Written beside ``out`` and
    renamed into place, so a failed export leaves nothing half-written."""
    family = hf_family(model.config)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PretrainedError(f"{out}: exists and is not empty; choose a new directory")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        hf_config = hf_config_object(model.config, family)
        hf_config.dtype = next(model.parameters()).dtype
        hf_config.save_pretrained(str(staging))
        save_file(hf_state(model, family), str(staging / "model.safetensors"), metadata={"format": "pt"})
        if isinstance(tokenizer, HFTokenizer):
            HFTokenizer.save(tokenizer, staging)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out

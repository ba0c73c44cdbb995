"""Overrides for the tiny presets whose AU-Net splits by entropy (configs/tiny/aunet2-entropy.yaml):
they read their byte model's architecture from its trained run (runs/byte-entropy), which the
tests that build every preset do not train; ``preset_overrides`` gives it inline
(``model.split.byte_model``), from configs/tiny/byte-entropy.yaml. The entropy model's weights
are then zeros (``strata.models.entropy``): every byte a split."""

import json
from pathlib import Path

from strata.config import config_to_dict, load_config, read_yaml

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def preset_overrides(path: Path) -> list[str]:
    split = (read_yaml(Path(path)).get("model") or {}).get("split") or {}
    if split.get("rule") != "entropy":
        return []
    byte_model = config_to_dict(load_config(TINY / "byte-entropy.yaml"))["model"]
    return [f"model.split.byte_model={json.dumps(byte_model)}"]

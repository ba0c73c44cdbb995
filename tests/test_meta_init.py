"""Build on the meta device, then initialise: ``build_model(config, device="meta")`` allocates
nothing, and ``to_empty`` plus ``init_weights`` give the weights a seeded build gives, bit for bit.

The expected fingerprints were computed from the weights seeded construction gave before
``init_weights`` existed, so construction still draws what it always drew. (FSDP's sharded
initialisation is held against one process in tests/test_distributed.py.)
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from entropy_presets import preset_overrides

from strata import build_model, load_config
from strata.models import init_weights
from strata.train.distributed import World, parallelize

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
H = "model.hybrid."
# Every tiny config, and the designs of the hybrid and upsampling that draw or fill parameters of
# their own: (file, overrides).
CASES = {path.stem: (path.name, preset_overrides(path)) for path in sorted(TINY.glob("*.yaml"))} | {
    "intra-lambda": ("intra.yaml", [H + "scale=lambda"]),
    "intra-gate": ("intra.yaml", [H + "scale=gate"]),
    "intra-vector": ("intra.yaml", [H + "scale=vector"]),
    "intra-scalar": ("intra.yaml", [H + "scale=scalar"]),
    "intra-alpha": ("intra.yaml", [H + "scale=alpha", H + "fusion=add"]),
    "tt-lambda": ("intra.yaml", [H + "branches=attn_attn", H + "scale=lambda"]),
    "mm-lambda": ("intra.yaml", [H + "branches=ssm_ssm", H + "scale=lambda"]),
    "shared-values-joint": ("intra.yaml", [H + "share_value=true", H + "out_proj=joint", H + "norm=none"]),
    "aunet2-repeat": ("aunet2.yaml", ["model.upsample=repeat"]),
}
# fingerprint() of torch.manual_seed(0); build_model(config), computed before this change.
FINGERPRINTS = {
    "aunet2-hybrid": -29.8755416954,
    "aunet2": 28.1670856304,
    "aunet3": 5.06644650786,
    "bpe-transformer": 21.6862968031,
    "byte-transformer": 14.698095123,
    "hybrid-family": 37.560189635,
    "inter": 29.4636276748,
    "intra-moe": 42.8709627924,
    "intra": 4.22125208826,
    "mamba2": 39.0886083903,
    "mqar": -5.04651098838,
    "swa": 14.943784283,
    "transformer": 14.943784283,
    "intra-lambda": 25.1428959868,
    "intra-gate": 18.9182710754,
    "intra-vector": 32.0058737524,
    "intra-scalar": 42.8551702417,
    "intra-alpha": 42.6149459279,
    "tt-lambda": -3.6471055902,
    "mm-lambda": 11.8528020607,
    "shared-values-joint": 12.9207797836,
    "aunet2-repeat": 23.713456031,
    # Added with the Gated DeltaNet presets (issue 24), from their first seeded build.
    "gdn": -18.2164407292,
    "inter-gdn": -7.6177094436,
    # Added with learned splits (issue 27), from its first seeded build: aunet2's weights and the
    # routers' identity matrices.
    "hnet2": -0.4446753414,
    # Added with the entropy rule, from their first seeded build. The AU-Net's own weights are
    # aunet2's: its frozen byte model draws nothing, and its placeholder weights are zeros.
    "byte-entropy": -0.8117773202,
    "aunet2-entropy": 28.1670856304,
    # Added with Kimi Delta Attention, from its first seeded build.
    "kda": -5.3056499394,
}
SEVEN_B = ROOT / "configs" / "paper" / "aunet2-7b.yaml"


def config(name: str):
    file, overrides = CASES[name]
    return load_config(TINY / file, overrides)


def fingerprint(model) -> float:
    """Σ over the state dict's tensors of each one's dot product with fixed pseudo-random weights
    (drawn from a generator of their own): any drawn value that changes moves it, while the last
    bit of a vectorised normal_ on another CPU does not."""
    total = 0.0
    for index, tensor in enumerate(model.state_dict().values(), start=1):
        weights = torch.rand(tensor.numel(), generator=torch.Generator().manual_seed(index), dtype=torch.float64) - 0.5
        total += float(tensor.double().flatten() @ weights)
    return total


def everything(model) -> dict[str, torch.Tensor]:
    """Parameters and buffers, the non-persistent ones included."""
    return dict(model.named_parameters()) | dict(model.named_buffers())


def assert_identical(model, expected) -> None:
    got, want = everything(model), everything(expected)
    assert got.keys() == want.keys()
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert not different, different


def test_the_cases_are_fingerprinted():
    assert FINGERPRINTS.keys() == CASES.keys()


@pytest.mark.parametrize("name", CASES)
def test_meta_then_init_weights_is_the_seeded_build(name):
    torch.manual_seed(0)
    built = build_model(config(name))
    # Construction draws what it drew before init_weights existed (to a tolerance far below what
    # a value drawn in another order moves, far above a last bit of normal_ on another CPU).
    assert fingerprint(built) == pytest.approx(FINGERPRINTS[name], rel=1e-6, abs=1e-6)

    torch.manual_seed(0)
    meta = build_model(config(name), device="meta")
    assert all(tensor.is_meta for tensor in everything(meta).values())
    meta.to_empty(device="cpu")
    init_weights(meta)
    assert_identical(meta, built)

    # Every parameter and buffer is (re)filled in place, whatever it held.
    with torch.no_grad():
        for tensor in everything(meta).values():
            tensor.fill_(math.nan)
    torch.manual_seed(0)
    init_weights(meta)
    assert_identical(meta, built)


def test_parallelize_materialises_a_meta_model_in_one_process():
    """What the trainer does under FSDP, in the plain World: build on meta, then parallelize."""
    torch.manual_seed(5)
    built = build_model(config("aunet2-hybrid"))
    cfg = config("aunet2-hybrid")
    torch.manual_seed(5)
    model = build_model(cfg, device="meta")
    assert parallelize(model, World(), cfg.train, bf16=False) is model
    assert_identical(model, built)


def test_a_meta_build_of_the_7b_aunet_allocates_nothing():
    """Peak RSS of a fresh process that imports torch and strata and builds the 7.96B-parameter
    AU-Net preset on meta: well under the 32 GB its fp32 weights would take."""
    # VmHWM, the peak of this process's own memory map: getrusage's ru_maxrss would also count the
    # pages the child shared with the (large) test process between fork and exec.
    script = (
        "import re\n"
        "from strata import build_model, load_config\n"
        f"model = build_model(load_config({str(SEVEN_B)!r}), device='meta')\n"
        "assert all(p.is_meta for p in model.parameters())\n"
        "peak = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
        "print(sum(p.numel() for p in model.parameters()), peak)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    params, peak_kib = map(int, result.stdout.split())
    print(f"{params / 1e9:.2f}B parameters on meta: peak RSS {peak_kib / 1024:.0f} MiB")
    assert params > 7.9e9
    assert peak_kib < 1024 * 1024

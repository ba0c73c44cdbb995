"""Training under torchrun: real 2-process DDP and FSDP2 runs (gloo on CPU) against one process.

The global batch is the same at every world size, so the losses must agree step by step; a
checkpoint saved at one world size must continue the same loss curve at another; a killed rank
must end the job with a clear error and leave a checkpoint that resumes.
"""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from strata import build_model, load_config
from strata.config import ConfigError
from strata.data import ByteTokenizer, TokenLoader, corpus_path
from strata.train.checkpoint import CheckpointError
from strata.train.distributed import World, parallelize, session
from strata.train.distributed_checkpoint import read_metadata
from strata.train.runs import TrainedModel, open_run, save_as_run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
FAST = ["--quiet", "model.context_length=64", "train.batch_size=8", "train.eval_bytes=2048", "data.valid_fraction=0.002",
        "train.eval_every=1000", "train.save_every=5"]
STEPS = 10
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes share the two cores


def strata(*args, processes=1, check=True, timeout=300):
    """``strata ARGS`` in one process, or under torchrun in ``processes`` (a free port each time)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)] if processes > 1 else []
    command = [sys.executable, *launcher, "-m", "strata", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), "a step logged twice: only rank 0 writes metrics"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def differences(a: dict, b: dict, steps) -> list[float]:
    return [abs(a[step] - b[step]) for step in steps]


def rewind(run_dir: Path, copy: Path, step: int) -> Path:
    """A copy of ``run_dir`` as if it had stopped after its checkpoint of ``step``."""
    shutil.copytree(run_dir, copy)
    for checkpoint in (copy / "checkpoints").iterdir():
        if int(checkpoint.name.removeprefix("step-")) > step:
            shutil.rmtree(checkpoint)
    return copy


@pytest.fixture(scope="module")
def shakespeare() -> Path:
    """The corpus's path, fetched here once: the ranks of a job read it and never race to download it."""
    return corpus_path("shakespeare")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare) -> dict[str, Path]:
    """The same 10-step run in 1 process, under 2-process DDP and under 2-process FSDP."""
    base = tmp_path_factory.mktemp("runs")
    common = ["train", TINY / "transformer.yaml", "--data", shakespeare, "--steps", STEPS, *FAST]
    strata(*common, "--out", base / "single")
    strata(*common, "--out", base / "ddp", "train.parallel=ddp", processes=2)
    strata(*common, "--out", base / "fsdp", "train.parallel=fsdp", processes=2)
    return {name: base / name for name in ("single", "ddp", "fsdp")}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_take_the_steps_of_one(runs, parallel):
    single, multi = losses(runs["single"]), losses(runs[parallel])
    assert sorted(multi) == list(range(1, STEPS + 1))
    print(f"{parallel}: |loss - 1 process| step 1 {differences(single, multi, [1])[0]:.2e}, "
          f"step {STEPS} {differences(single, multi, [STEPS])[0]:.2e}")
    assert max(differences(single, multi, range(1, 4))) < 1e-5
    assert max(differences(single, multi, range(1, STEPS + 1))) < 1e-3


def test_a_distributed_checkpoint_opens_for_eval_with_the_weights_of_one_process(runs):
    checkpoint = runs["fsdp"] / "checkpoints" / f"step-{STEPS:06d}"
    assert (checkpoint / "dcp" / ".metadata").is_file() and not (checkpoint / "optimizer.pt").exists()
    distributed, single = open_run(checkpoint), open_run(runs["single"])
    assert distributed.checkpoint == checkpoint
    for name, tensor in single.model.state_dict().items():
        torch.testing.assert_close(distributed.model.state_dict()[name], tensor, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("saved, resumed, parallel", [("fsdp", 1, None), ("single", 2, "fsdp"), ("ddp", 2, "fsdp")])
def test_resuming_at_another_world_size_continues_the_same_curve(runs, tmp_path, saved, resumed, parallel):
    run = rewind(runs[saved], tmp_path / "run", 5)
    strata("train", "--resume", run, "--quiet", *([f"train.parallel={parallel}"] if parallel else []), processes=resumed)
    single, continued = losses(runs["single"]), losses(run)
    assert sorted(continued) == list(range(1, STEPS + 1))
    assert max(differences(single, continued, range(6, STEPS + 1))) < 1e-4


def test_fine_tuning_under_fsdp_starts_from_the_pretrained_weights_as_one_process_does(runs, tmp_path, shakespeare):
    """``--init-from`` the 10-step run: under 2-process FSDP every rank keeps its shards of the
    pretrained weights, and the steps are those of one process; both start near where the
    pretrained run ended, far below a random model's first loss."""
    common = ["train", TINY / "transformer.yaml", "--init-from", runs["single"], "--data", shakespeare, "--steps", 3,
              *FAST, "train.seed=1"]
    strata(*common, "--out", tmp_path / "single")
    strata(*common, "--out", tmp_path / "fsdp", "train.parallel=fsdp", processes=2)
    single, sharded, pretrained = losses(tmp_path / "single"), losses(tmp_path / "fsdp"), losses(runs["single"])
    assert sorted(sharded) == [1, 2, 3]
    assert max(differences(single, sharded, [1, 2, 3])) < 1e-5
    assert single[1] < pretrained[1] - 0.5 and abs(single[1] - pretrained[STEPS]) < 0.5


@pytest.mark.parametrize("family", ["intra-moe", "aunet2"])
def test_moe_and_aunet_train_under_ddp_as_in_one_process(tmp_path, shakespeare, family):
    common = ["train", TINY / f"{family}.yaml", "--data", shakespeare, "--steps", 2, *FAST,
              "train.batch_size=4", "train.grad_accum=2"]
    strata(*common, "--out", tmp_path / "single")
    strata(*common, "--out", tmp_path / "ddp", processes=2)
    single, ddp = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert sorted(ddp) == [1, 2] and max(differences(single, ddp, [1, 2])) < 1e-5


def test_an_entropy_aunet_trains_and_resumes_under_fsdp_as_in_one_process(tmp_path, shakespeare):
    """The entropy rule's frozen byte model stays whole on every rank under FSDP (its scores place
    the splits): 2-process FSDP takes the steps of one process, saves shards that hold the byte
    model, and resumes from them to the straight run's next loss."""
    text = tmp_path / "text.txt"
    text.write_bytes(shakespeare.read_bytes()[:150_000])  # a short corpus: every process scores it
    byte_config = load_config(TINY / "byte-entropy.yaml")
    torch.manual_seed(0)
    byte_model = build_model(byte_config).eval()
    byte_run = save_as_run(TrainedModel(byte_config, byte_model, ByteTokenizer(), tmp_path), tmp_path / "byte")
    common = ["train", TINY / "aunet2-entropy.yaml", "--data", text, "--steps", 4, *FAST, "train.batch_size=4",
              "train.save_every=2", f"model.split.model={byte_run}"]
    strata(*common, "--out", tmp_path / "single")
    strata(*common, "--out", tmp_path / "fsdp", "train.parallel=fsdp", processes=2)
    resumed = rewind(tmp_path / "fsdp", tmp_path / "resumed", 2)
    strata("train", "--resume", resumed, "--quiet", "train.parallel=fsdp", processes=2)
    single, sharded, continued = losses(tmp_path / "single"), losses(tmp_path / "fsdp"), losses(resumed)
    assert sorted(sharded) == sorted(continued) == [1, 2, 3, 4]
    assert max(differences(single, sharded, [1, 2, 3, 4])) < 1e-5
    assert max(differences(single, continued, [3, 4])) < 1e-4
    saved = open_run(resumed).model.entropy.lm.state_dict()
    for name, tensor in byte_model.state_dict().items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0, msg=name)


FSDP_INIT = """
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from strata import build_model, load_config
from strata.train.distributed import parallelize, session

out, *paths = sys.argv[1:]
with session(load_config(paths[0], ["train.parallel=fsdp"]).train) as world:
    saved = {}
    for path in paths:
        config = load_config(path, ["train.parallel=fsdp"])
        torch.manual_seed(config.train.seed)  # as the trainer builds
        model = build_model(config, device="meta")
        parallelize(model, world, config.train, bf16=False)
        held = sum(param.to_local().numel() for param in model.parameters())
        whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        saved[path] = (whole, dict(model.named_buffers()), held)
    if world.is_main:
        torch.save(saved, out)
"""


def test_fsdp_fills_each_ranks_shards_with_the_weights_of_one_process(tmp_path):
    """Under FSDP the model is built on meta, sharded, and each rank allocates and fills only its
    shards; gathered, they are the weights one process builds from the same seed, bit for bit."""
    script, weights = tmp_path / "fsdp_init.py", tmp_path / "weights.pt"
    script.write_text(FSDP_INIT)
    paths = [str(TINY / "intra-moe.yaml"), str(TINY / "aunet2-hybrid.yaml")]  # MoE, hybrid, Mamba-2, AU-Net
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               str(weights), *paths]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(weights, weights_only=True)
    for path in paths:
        whole, buffers, held = saved[path]
        config = load_config(path)
        torch.manual_seed(config.train.seed)
        single = build_model(config)
        total = sum(param.numel() for param in single.parameters())
        assert total / 2 <= held < 0.55 * total  # rank 0 holds its half, not the whole
        assert whole.keys() == single.state_dict().keys()
        for name, tensor in single.state_dict().items():
            assert torch.equal(whole[name], tensor), name
        for name, buffer in single.named_buffers():
            assert torch.equal(buffers[name], buffer), name


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def test_killing_a_rank_stops_the_job_clearly_and_the_run_resumes(tmp_path, shakespeare):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "strata",
               "train", str(TINY / "transformer.yaml"), "--data", str(shakespeare),
               "--steps", "40", *FAST, "--out", str(run)]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    checkpoint = run / "checkpoints" / "step-000005"
    deadline = time.time() + 120
    while not checkpoint.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    rank_1 = [pid for pid in _children(job.pid) if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]
    assert checkpoint.exists() and rank_1, "the job ended before its first checkpoint"
    os.kill(rank_1[0], signal.SIGKILL)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode != 0
    assert "Signal 9 (SIGKILL)" in stderr  # torchrun's report names the rank that died
    assert f"--resume {run}" in stderr  # and rank 0 how to continue
    assert not (run / "checkpoints" / "step-000040").exists(), "killed too late to test resuming"

    strata("train", "--resume", run, "--quiet", processes=2)
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, 41)) and all(np.isfinite(list(resumed.values())))


# --- in one process --------------------------------------------------------------------------------


def test_the_global_batch_must_split_evenly(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    config = load_config(TINY / "transformer.yaml", ["train.batch_size=8"])
    with pytest.raises(ConfigError, match=r"train\.batch_size"), session(config.train):
        pass
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"train\.parallel"), session(load_config(TINY / "transformer.yaml", ["train.parallel=none"]).train):
        pass


def test_the_ranks_rows_make_up_the_global_batch():
    tokens = np.arange(1000, dtype=np.int32)
    whole = TokenLoader(tokens, 16, 8, seed=3)
    shards = [TokenLoader(tokens, 16, 8, seed=3) for _ in range(4)]
    for _ in range(5):
        expected = whole.next_batch().tokens
        got = torch.cat([loader.next_batch(rank, 4).tokens for rank, loader in enumerate(shards)])
        assert torch.equal(got, expected)
    assert all(loader.state_dict() == whole.state_dict() for loader in shards)


def test_activation_checkpointing_gives_the_same_gradients():
    config = load_config(TINY / "inter.yaml", ["train.activation_checkpointing=true"])
    torch.manual_seed(0)
    plain = build_model(config)
    recomputed = build_model(config)
    recomputed.load_state_dict(plain.state_dict())
    forward = parallelize(recomputed, World(), config.train, bf16=False)
    tokens = torch.randint(0, 259, (2, 33))
    for model in (plain, forward):
        model(tokens).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo unsafe",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="never needs"):
        read_metadata(tmp_path)

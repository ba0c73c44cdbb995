"""``strata report``: the table's figures from the cost model and the run files, the Pareto front,
and plots drawn only from data that exists; on run folders written here by hand (the sweep test
makes a report of real runs)."""

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import save_file

from strata.cli import main
from strata.config import config_to_dict, load_config
from strata.cost.model import model_cost
from strata.evals.report import save_evaluation
from strata.experiments.budget import run_cost
from strata.experiments.plots import pareto_front
from strata.experiments.report import collect, print_report, write_report
from strata.models import build_model

ROOT = Path(__file__).resolve().parents[1]
MACHINE = {"processor": "x86_64", "cpu_count": 2, "threads": 1, "torch": "2", "device": "cpu", "load_average": 1.5}


def make_run(folder: Path, name: str, layout: str, bpb: list[float], decode: float | None = None,
             mqar: float | None = None, needle: list[float] | None = None, planned: bool = True,
             preset: str = "inter", overrides: tuple[str, ...] = ()) -> Path:
    """A run folder as a sweep leaves it: plan.json (or only config.yaml), metrics.jsonl, evals/."""
    run_dir = folder / name
    run_dir.mkdir(parents=True)
    config = load_config(ROOT / f"configs/tiny/{preset}.yaml", [f"model.layout={layout}", "train.batch_size=2", *overrides])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config)))
    if planned:
        plan = {"name": name, "choices": {"family": layout[0]}, "config": config_to_dict(config),
                "cost": asdict(run_cost(config))}
        (run_dir / "plan.json").write_text(json.dumps(plan))
        (run_dir / "done.json").write_text("{}")
    tokens_per_step = 2 * 256
    lines = []
    for index, value in enumerate(bpb, start=1):
        lines.append({"step": 10 * index, "loss": 1.0, "tokens": 10 * index * tokens_per_step})
        lines.append({"step": 10 * index, "val_bpb": value, "val_bytes": 1000})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if decode is not None:
        result = {"tokens_per_s": decode, "rounds": [decode], "batch": 1, "context": 256, "new": 32, "machine": MACHINE}
        save_evaluation(run_dir, "decode", "ckpt", {"tokens_per_s": decode}, result, "")
    if mqar is not None:
        rows = [{"seq_len": 64, "n_pairs": n, "recall": mqar / n * 4, "n": 100, "chance": 1 / 127} for n in (4, 8)]
        save_evaluation(run_dir, "mqar", "ckpt", {"recall": mqar}, {"rows": rows}, "")
    if needle is not None:
        result = {"lengths": [256, 512], "depths": [0.0, 1.0], "accuracy": [needle, needle], "mean": sum(needle) / 2}
        save_evaluation(run_dir, "needle", "ckpt", {"accuracy": result["mean"]}, result, "")
    return run_dir


def make_sweep(folder: Path, runs: list[str]) -> Path:
    sweep = {"sweep": "configs/sweeps/x.yaml", "description": "test sweep", "size": "cpu",
             "budget": {"kind": "flops", "value": 1e12, "head": False}, "axes": ["family"],
             "runs": [{"name": name, "choices": {}} for name in runs]}
    (folder / "sweep.json").write_text(json.dumps(sweep))
    return folder


def test_pareto_front():
    points = [(100, 2.0), (200, 2.5), (50, 1.9), (150, 2.6), (200, 2.4), (10, 1.9)]
    # (150, 2.6) is beaten by (200, 2.4), (200, 2.5) too; (10, 1.9) by (50, 1.9): as good, faster.
    assert pareto_front(points, higher_is_better=False) == [2, 0, 4]
    assert pareto_front([(1, 0.5), (2, 0.5), (3, 0.1)], higher_is_better=True) == [1, 2]
    assert pareto_front([(1, 1.0), (1, 1.0)], higher_is_better=False) == [0, 1]  # equal points: neither beats the other


def test_report_of_a_sweep_with_every_evaluation(tmp_path):
    names = ["attention", "mamba", "inter"]
    make_run(tmp_path, "attention", "AAAA", [3.0, 2.5, 2.2], decode=500.0, mqar=0.9, needle=[1.0, 0.0])
    make_run(tmp_path, "mamba", "MMMM", [3.1, 2.6, 2.3], decode=900.0, mqar=0.3, needle=[0.5, 0.0])
    make_run(tmp_path, "inter", "MAMM", [3.0, 2.4, 2.1], decode=700.0, mqar=0.8)
    report = collect([make_sweep(tmp_path, names)], context=8192)
    assert [run.name for run in report.runs] == names
    plots = write_report(report, tmp_path)
    # No hybrids, and no run saved loss by position or languages (test_eval_suite draws those).
    absent = ("learned branch weights per layer", "loss by position", "bits per character by language")
    drawn = [outcome for title, outcome in plots.items() if title not in absent]
    assert plots["loss by position"].startswith("no run has a saved loss-by-position evaluation")
    assert all(outcome.endswith(".png") and Path(outcome).stat().st_size > 1000 for outcome in drawn), plots

    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [row["run"] for row in rows] == names and rows[0]["family"] == "A"
    for row, run in zip(rows, report.runs):
        cost = model_cost(run.config.model, 256, "fp32")
        assert int(row["tokens"]) == 30 * 512
        assert float(row["train FLOPs"]) == pytest.approx(30 * 512 * cost.flops_per_token)
        assert float(row["cache MiB @ 8,192"]) == pytest.approx(model_cost(run.config.model, 8192, "bf16").cache_mib)
        assert float(row["val bpb"]) == float(row["val bpb"])  # a number
    assert [float(row["val bpb"]) for row in rows] == [2.2, 2.3, 2.1]
    assert [float(row["mqar recall"]) for row in rows] == [0.9, 0.3, 0.8]
    assert rows[2]["needle accuracy"] == "" and float(rows[0]["decode tok/s (this machine)"]) == 500.0

    markdown = (tmp_path / "report.md").read_text()
    assert "FLOPs-matched at 1e+12" in markdown and "measured on this machine (x86_64, cpu, 1 threads)" in markdown
    assert "| attention | A | AAAA |" in markdown and "![quality against decode throughput](quality_vs_decode.png)" in markdown
    console = Console(record=True, width=250)
    print_report(console, report, tmp_path)
    text = console.export_text()
    assert all(name in text for name in names) and "decode tok/s" in text


def test_plots_without_data_are_skipped_with_the_reason(tmp_path):
    make_run(tmp_path, "bare", "AAMM", [])
    report = collect([make_sweep(tmp_path, ["bare", "never-started"])], context=1024)
    assert [run.name for run in report.runs] == ["bare"]  # a run without a folder is left out
    plots = write_report(report, tmp_path)
    assert plots["cache against context length"].endswith("cache_vs_context.png")
    assert plots["quality against training FLOPs"] == "no run has validation (or MQAR recall) points in metrics.jsonl"
    assert plots["quality against decode throughput"] == "no run has a decode evaluation"
    assert plots["MQAR recall"] == "no run has an MQAR evaluation"
    assert sorted(path.name for path in tmp_path.glob("*.png")) == ["cache_vs_context.png"]
    assert "- MQAR recall: skipped, no run has an MQAR evaluation" in (tmp_path / "report.md").read_text()


def test_quality_falls_back_to_recall_and_runs_outside_sweeps(tmp_path, capsys):
    # MQAR runs have no validation bpb: quality against decode speed is recall against it.
    one = make_run(tmp_path, "one", "AAAA", [], decode=100.0, mqar=0.9, planned=False)
    two = make_run(tmp_path, "two", "MMMM", [], decode=300.0, mqar=0.4, planned=False)
    out = tmp_path / "out"
    assert main(["report", str(one), str(two), "--out", str(out), "--context", "4096"]) == 0
    assert (out / "quality_vs_decode.png").exists() and (out / "mqar.png").exists()
    assert "not finished (partial figures): one, two" in capsys.readouterr().out
    header = (out / "report.csv").read_text().splitlines()[0]
    assert header.startswith("run,blocks,params") and "cache MiB @ 4,096" in header
    with pytest.raises(ValueError, match="neither a sweep folder"):
        collect([tmp_path / "nothing"], 1024)


def save_weights(run_dir: Path, config_overrides: tuple[str, ...], layout: str, set_weights) -> None:
    """A checkpoint of the run's model whose learned branch weights ``set_weights`` chooses."""
    config = load_config(ROOT / "configs/tiny/intra.yaml", [f"model.layout={layout}", *config_overrides])
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        set_weights([block.mixer for block in model.blocks])
    (run_dir / "checkpoints/step-000010").mkdir(parents=True)
    save_file(model.state_dict(), str(run_dir / "checkpoints/step-000010/model.safetensors"))


def test_report_shows_learned_alpha_and_lambda_per_layer(tmp_path):
    """α (Appendix Q's α·Mamba + (1 − α)·attention) and Diff-T's λ of each hybrid layer, read from
    the newest checkpoint; λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init computed here, with λ_init
    0.2 at layer 1 and 0.8 − 0.6·e^(−1.2) = 0.6192834728526787 at layer 5."""
    alpha = ("model.hybrid.scale=alpha", "model.hybrid.fusion=add")
    lam = ("model.hybrid.branches=attn_attn", "model.hybrid.scale=lambda")
    runs = {"alpha": make_run(tmp_path, "alpha", "MHMMH", [2.5], preset="intra", overrides=alpha),
            "tt_lambda": make_run(tmp_path, "tt_lambda", "HMMMH", [2.4], preset="intra", overrides=lam),
            "final": make_run(tmp_path, "final", "MHMMH", [2.6], preset="intra")}

    def set_alpha(mixers):
        mixers[1].alpha.fill_(0.25)
        mixers[4].alpha.fill_(0.75)

    vectors = {}

    def set_lambda(mixers):
        for layer in (1, 5):
            vectors[layer] = (0.05, 0.1, 0.02 * layer, 0.15)  # each vector filled with one value
            for name, value in zip(("q1", "k1", "q2", "k2"), vectors[layer]):
                getattr(mixers[layer - 1], f"lambda_{name}").fill_(value)

    save_weights(runs["alpha"], alpha, "MHMMH", set_alpha)
    save_weights(runs["tt_lambda"], lam, "HMMMH", set_lambda)
    head = 32  # the λ vectors are as wide as a Q/K head of the tiny intra preset
    expected_lambda = {str(layer): math.exp(head * q1 * k1) - math.exp(head * q2 * k2) + init
                       for (layer, (q1, k1, q2, k2)), init in zip(vectors.items(), (0.2, 0.6192834728526787))}

    report = collect([make_sweep(tmp_path, list(runs))], context=1024)
    mixes = {run.name: run.mix for run in report.runs}
    assert mixes["alpha"] == {"alpha": {"2": 0.25, "5": 0.75}} and mixes["final"] == {}
    assert mixes["tt_lambda"]["lambda"] == pytest.approx(expected_lambda, abs=1e-6)

    plots = write_report(report, tmp_path)
    assert plots["learned branch weights per layer"].endswith("branch_mix.png")
    markdown = (tmp_path / "report.md").read_text()
    assert "## Learned branch weights per layer" in markdown and "| layer | alpha α | tt_lambda λ |" in markdown
    lam1, lam5 = (f"{expected_lambda[layer]:.4f}" for layer in ("1", "5"))
    for row in (f"| 1 | – | {lam1} |", "| 2 | 0.2500 | – |", f"| 5 | 0.7500 | {lam5} |"):
        assert row in markdown
    console = Console(record=True, width=250)
    print_report(console, report, tmp_path)
    text = console.export_text()
    assert "learned branch weights per layer" in text and "0.7500" in text and lam1 in text

"""One run of a sweep, from its directory: train (or resume), evaluate, then mark it finished.

    python -m strata.experiments.sweep_run SWEEP_OUT/NAME

``strata sweep`` writes ``NAME/plan.json`` (the resolved config with its planned steps, the
evaluations, the costs) and ``config.yaml``, then starts this in a subprocess per run. The steps
leave markers, each written whole under a temporary name and renamed:

- ``trained.json`` once training has finished, so a run killed while it is evaluated is not
  trained again;
- ``done.json`` once every evaluation is saved too: the run is finished and a sweep skips it.

A run killed while training continues from its newest checkpoint (the trainer's exact resume);
one killed before its first checkpoint starts over. MQAR runs (the sweep's ``mqar`` section) train
for minutes without checkpoints, so a killed one starts over. A lock on ``NAME/.lock`` keeps two
processes (two sweeps, or one left running by a killed parent) from running one run at once.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from strata.config import Config, validate_config
from strata.experiments.sweep_spec import MQARTraining, SweepEval
from strata.files import write_atomically
from strata.train.metrics import METRICS

PLAN, TRAINED, DONE, LOCK = "plan.json", "trained.json", "done.json", ".lock"
BUSY = 75  # exit status: another process holds the run's lock (EX_TEMPFAIL)


def write_json(path: Path, record: dict) -> None:
    write_atomically(path, json.dumps(record, indent=1) + "\n")


def execute(run_dir: Path) -> None:
    plan = json.loads((run_dir / PLAN).read_text())
    config = validate_config(plan["config"], str(run_dir / PLAN))
    evaluation = SweepEval.model_validate(plan["eval"])
    start = time.perf_counter()
    if plan["mqar"] is not None:
        model = _train_mqar(config, MQARTraining.model_validate(plan["mqar"]), run_dir)
        trained = {"step": config.train.steps}
        _evaluate(run_dir, config, evaluation, model, None, str(run_dir), plan["mqar"]["seq_len"])
    else:
        from strata.evals.suite import run_suite
        from strata.train.runs import open_run

        if not (run_dir / TRAINED).exists():
            _train_text(config, run_dir)
        trained = json.loads((run_dir / TRAINED).read_text())
        opened = open_run(run_dir, device=_device(config))
        run_suite(opened, evaluation.request)  # those of ``strata eval`` the sweep asks for, if any
        seq_len = config.train.seq_len or config.model.context_length
        _evaluate(run_dir, config, evaluation, opened.model, opened.tokenizer, str(opened.checkpoint), seq_len)
    evaluations = sorted(path.stem for path in (run_dir / "evals").glob("*.json"))
    write_json(run_dir / DONE, {"name": plan["name"], "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "steps": trained["step"], "val_bpb": trained.get("val_bpb"), "evaluations": evaluations,
                                "seconds": round(time.perf_counter() - start, 1)})


def _device(config: Config) -> str:
    """Where to evaluate: where the run trained (``train.device``; ``auto`` is a GPU when there is one)."""
    import torch

    if config.train.device != "auto":
        return config.train.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _train_text(config: Config, run_dir: Path) -> None:
    from strata.train.checkpoint import checkpoint_dir, list_checkpoints
    from strata.train.trainer import train

    complete = list_checkpoints(run_dir)
    if complete:
        print(f"resuming from step {int(complete[0].name[5:])} ({complete[0]})", file=sys.stderr, flush=True)
    else:  # a save cut short leaves only a temporary folder, which would stop a fresh start
        shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)
    result = train(config, run_dir, resume=bool(complete))
    if result.stopped_early == "interrupted":
        raise KeyboardInterrupt
    write_json(run_dir / TRAINED, {"step": result.step, "tokens": result.tokens, "val_bpb": result.val_bpb,
                                   "gzip_bpb": result.gzip_bpb, "stopped_early": result.stopped_early, "sample": result.sample})


def _train_mqar(config: Config, spec: MQARTraining, run_dir: Path):
    """Train on MQAR (``strata.evals.mqar_train``) with the run's model and train settings."""
    from strata.evals.mqar_train import train_mqar

    train = config.train
    tokens_per_step = train.batch_size * spec.seq_len
    with (run_dir / METRICS).open("w") as metrics:  # a restarted MQAR run starts over

        def log(record: dict) -> None:
            record = {**record, "tokens": record["step"] * tokens_per_step}
            metrics.write(json.dumps(record) + "\n")
            if "recall" in record:
                metrics.flush()
                print(f"step {record['step']}/{train.steps}  loss {record['loss']:.3f}  recall {record['recall']:.3f}",
                      file=sys.stderr, flush=True)

        model, _ = train_mqar(config.model, seq_len=spec.seq_len, n_pairs=spec.n_pairs, steps=train.steps,
                              batch_size=train.batch_size, lr=train.lr, seed=train.seed, weight_decay=train.weight_decay,
                              warmup=train.warmup, eval_every=train.eval_every, callback=log)
    return model


def _evaluate(run_dir: Path, config: Config, evaluation: SweepEval, model, tokenizer, checkpoint: str, seq_len: int) -> None:
    """The sweep's own evaluations: decode throughput and the MQAR grid (the suite's are run above)."""
    from strata.evals.report import save_evaluation

    if evaluation.decode is not None:
        from strata.evals.throughput import decode_throughput, throughput_markdown

        decode = evaluation.decode
        prompts = _prompts(config, tokenizer, decode.context or seq_len, decode.batch)
        result = decode_throughput(model, prompts, decode.new, decode.repeats)
        save_evaluation(run_dir, "decode", checkpoint, {"tokens_per_s": result["tokens_per_s"]}, result, throughput_markdown(result))
    if evaluation.mqar is not None:
        from strata.evals.mqar import mqar_grid, mqar_markdown

        spec = evaluation.mqar
        lengths = spec.seq_lens or [n for n in (seq_len, 2 * seq_len) if n <= config.model.context_length]
        rows = [{"family": run_dir.name, **row} for row in mqar_grid(model, lengths, spec.pairs, spec.examples)]
        if not rows:
            raise ValueError(f"{run_dir}: eval.mqar: no length and pair count fit together ({lengths}, {spec.pairs})")
        headline = {"recall": float(np.mean([row["recall"] for row in rows]))}
        save_evaluation(run_dir, "mqar", checkpoint, headline, {"rows": rows}, mqar_markdown(rows))


def _prompts(config: Config, tokenizer, length: int, batch: int) -> list[list[int]]:
    """Decode prompts: the start of the validation text for a text model (so an AU-Net pools as it
    does on text), MQAR sequences for a model trained on MQAR."""
    if tokenizer is None:
        from strata.evals.mqar import make_mqar

        inputs, _ = make_mqar(batch, length, max(1, min(16, length // 4)))
        return inputs.tolist()
    from strata.data import load_documents, split_documents

    _, valid = split_documents(load_documents(config.data.sources, config.data.text_field), config.data.valid_fraction)
    ids = tokenizer.encode(b"".join(document.text for document in valid)[: 8 * length]).tolist()
    ids = (ids * (length // max(1, len(ids)) + 1))[: length - 1]  # repeated when the text is short
    return [[tokenizer.bos_id, *ids] for _ in range(batch)]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m strata.experiments.sweep_run SWEEP_OUT/NAME", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    with (run_dir / LOCK).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{run_dir}: another process is running this run", file=sys.stderr)
            return BUSY
        execute(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

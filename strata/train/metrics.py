"""Run metrics: JSON lines on disk (plus TensorBoard when installed) and a progress bar."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from strata.data.jsonl import json_objects
from strata.files import write_atomically


METRICS = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (none if absent). A record counts once its
    newline is written: a last line without one (the run was killed mid-write) is left out."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    complete = text[: text.rfind("\n") + 1]
    return [record for _, record in json_objects(path, complete)]


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``.

    On resume, lines after the checkpoint's step are dropped first: those steps are about to be
    trained again, and the file should describe the run as it finally happened.
    """

    def __init__(self, run_dir: Path, truncate_after: int = 0):
        self.path = Path(run_dir) / METRICS
        if self.path.exists():
            kept = [record for record in read_metrics(run_dir) if record["step"] <= truncate_after]
            write_atomically(self.path, "".join(json.dumps(record) + "\n" for record in kept))
        self.board = _tensorboard(Path(run_dir) / "tensorboard")

    def write(self, record: dict) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(record) + "\n")
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.board.add_scalar(key, value, record["step"])


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


class Progress:
    """A progress bar with loss, validation bpb, tokens/s and ETA; plain lines when not on a terminal."""

    def __init__(self, total: int, start: int, quiet: bool = False):
        self.console = Console(stderr=True)
        self.quiet = quiet
        self.fields = {"loss": "-", "bpb": "-", "speed": "-"}
        self.bar = None
        if not quiet and self.console.is_terminal:
            self.bar = RichProgress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("loss {task.fields[loss]}  val bpb {task.fields[bpb]}  {task.fields[speed]} tok/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, **self.fields)
        self.total = total
        self.last_line = 0

    def update(self, step: int, record: dict) -> None:
        if record.get("loss") is not None:
            self.fields["loss"] = f"{record['loss']:.3f}"
        if "val_bpb" in record:
            self.fields["bpb"] = f"{record['val_bpb']:.3f}"
        if "tokens_per_s" in record:
            self.fields["speed"] = f"{record['tokens_per_s']:,}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, **self.fields)
        elif not self.quiet and ("val_bpb" in record or step - self.last_line >= max(1, self.total // 20)):
            self.last_line = step
            print(f"step {step}/{self.total}  loss {self.fields['loss']}  val bpb {self.fields['bpb']}  "
                  f"{self.fields['speed']} tok/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

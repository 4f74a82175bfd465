"""Where a training stage's numbers go: RUN_DIR/<stage>_metrics.jsonl, and TensorBoard when asked for."""

from __future__ import annotations

import json
from pathlib import Path

from latentdiff.errors import ConfigError
from latentdiff.utils.files import write_text_atomic


class MetricsLog:
    """RUN_DIR/<stage>_metrics.jsonl: one JSON line per log interval, written by rank 0.

    On (re)start the file is cut back to the steps the run starts from, so lines logged after the
    last checkpoint by a killed run (and a half-written last line) never appear twice. With
    `tensorboard` set, every numeric field is also written as a scalar under RUN_DIR/tensorboard/<stage>.
    """

    def __init__(self, path: Path, start_step: int, enabled: bool = True, tensorboard: bool = False):
        self.path, self.enabled = path, enabled
        self.writer = None
        if not enabled:
            return
        kept = []
        if start_step > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= start_step:
                    kept.append(line + "\n")
        write_text_atomic(path, "".join(kept))
        if tensorboard:
            self.writer = tensorboard_writer(path.parent / "tensorboard" / path.name.removesuffix("_metrics.jsonl"),
                                             start_step)

    def write(self, record: dict):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def tensorboard_writer(log_dir: Path, start_step: int):
    """A SummaryWriter; events after `start_step` from a killed run are hidden by TensorBoard's purge_step."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard imports it lazily, with a less clear error)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("training.tensorboard is true but the tensorboard package is not installed: "
                          "`pip install tensorboard`, or set training.tensorboard=false") from None
    return SummaryWriter(str(log_dir), purge_step=start_step or None)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics file written by :class:`MetricsLog`."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

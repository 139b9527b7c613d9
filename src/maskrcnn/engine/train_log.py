"""What a training run records as it goes: metrics.jsonl (and TensorBoard's scalars), and durations as the
progress lines print them. The log lines themselves go through `maskrcnn.logs`.
"""

from __future__ import annotations

import json
from pathlib import Path

from maskrcnn.config import ConfigError
from maskrcnn.fileio import read_jsonl, write_text_atomic


class MetricsLogger:
    """Appends JSON records to metrics.jsonl and, with `tensorboard`, writes the same scalars to out_dir/tb."""

    def __init__(self, *, path: Path, tensorboard_dir: Path | None, enabled: bool) -> None:
        """path: metrics.jsonl; tensorboard_dir: where TensorBoard's event files go (None: no TensorBoard)."""
        self.path = path
        self.enabled = enabled
        self.tensorboard = None
        if enabled and tensorboard_dir is not None:
            self.tensorboard = summary_writer()(log_dir=str(tensorboard_dir))

    def drop_after(self, iteration: int) -> None:
        """Removes records past `iteration` (a resumed run repeats the iterations after its checkpoint), and a
        last line torn by a kill."""
        if self.enabled and self.path.is_file():
            kept = [record for record in read_jsonl(self.path) if record["iteration"] <= iteration]
            write_text_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            iteration = record["iteration"]
            for key, value in record.items():
                if isinstance(value, float):
                    self.tensorboard.add_scalar(f"train/{key}", value, iteration)
            for iou_type, stats in record.get("eval", {}).items():
                if iou_type in ("bbox", "segm"):
                    for key, value in stats.items():
                        if value is not None:
                            self.tensorboard.add_scalar(f"eval/{iou_type}_{key}", value, iteration)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def summary_writer() -> type:
    """TensorBoard's SummaryWriter class; checked before training starts.

    Raises:
        ConfigError: train.tensorboard is true but the tensorboard package is missing.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard: true needs the tensorboard package: pip install 'maskrcnn[tensorboard]' "
                          "(or pip install tensorboard), or set train.tensorboard=false") from None
    return SummaryWriter


def format_duration(seconds: float) -> str:
    """'1h02m', '4m10s', '35s'."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"

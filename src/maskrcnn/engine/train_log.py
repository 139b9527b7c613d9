"""What a training run records as it goes: metrics.jsonl (and TensorBoard's scalars), and durations as the
progress lines print them. The log lines themselves go through `maskrcnn.logs`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from maskrcnn.config import ConfigError, TrainConfig
from maskrcnn.engine.run_folder import RunFolder
from maskrcnn.fileio import read_jsonl, write_text_atomic

log = logging.getLogger("maskrcnn.engine.train")


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


def progress_line(record: dict, *, planned_iters: int, seconds_per_iteration: float | None,
                  images_per_iteration: int) -> str:
    """'iter 120/600  loss 1.234 (rpn_cls 0.050 ... mask 0.500)  lr 1.20e-02  13.2 images/s  ETA 4m10s'."""
    terms = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in record.items() if k.startswith("loss_"))
    line = f"iter {record['iteration']}/{planned_iters}  loss {record['loss']:.3f} ({terms})  lr {record['lr']:.2e}"
    if seconds_per_iteration is not None:
        left = (planned_iters - record["iteration"]) * seconds_per_iteration
        line += f"  {images_per_iteration / seconds_per_iteration:.1f} images/s  ETA {format_duration(left)}"
    return line


def announce(tc: TrainConfig, *, device: torch.device, start_iter: int, world_size: int, spent: float,
             folder: RunFolder) -> None:
    """Logs a run's set-up: iterations, device, total batch and the lr rule, the budget, where the log goes."""
    log.info(f"training {'up to ' if tc.max_minutes is not None else ''}{tc.max_iters} iterations on "
             f"{device} from iteration {start_iter}: {world_size} "
             f"process{'es' if world_size > 1 else ''} x {tc.batch_size} images = total batch "
             f"{world_size * tc.batch_size}; train.lr {tc.lr:g} is for this total batch (linear scaling rule: k "
             f"times the total batch, k times the lr)")
    if tc.max_minutes is not None:
        log.info(f"time budget {tc.max_minutes:g} min ({format_duration(spent)} spent): the schedule's length is "
                 f"fitted to the measured speed")
    log.info(f"log: {folder.log}" + (f", TensorBoard: {folder.tensorboard}" if tc.tensorboard else ""))

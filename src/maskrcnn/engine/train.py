"""Training loop: SGD / AdamW, warm-up then step or cosine schedule, bf16 autocast, gradient clipping, logging,
periodic evaluation, atomic checkpoints and exact resume.

Run directory (written by rank 0 only):
    config.yaml     the full config of the run
    metrics.jsonl   one JSON record per log period, {"iteration", "lr", "loss", "loss_*", "time"} with the losses
                    averaged over the period, and one per evaluation, {"iteration", "eval": {...metrics}}
    metrics.json    the last evaluation (plus detections.json, pr_curves.json)
    last.pt         checkpoint every checkpoint_period iterations and at the end; best.pt: best mask AP so far
    tb/             TensorBoard scalars when the tensorboard package is installed
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from maskrcnn.config import Config, config_to_dict, save_config
from maskrcnn.data import build_dataset, build_train_loader
from maskrcnn.engine import distributed
from maskrcnn.engine.evaluate import EvalResult, autocast, evaluate_dataset, images_to_model
from maskrcnn.model import build_model


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names the iteration and the loss term."""


class CheckpointError(ValueError):
    """A checkpoint file is missing or not one of ours; the message names the file."""


# ------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Writes `state` with torch.save so that `path` is always either the old file or the complete new one.

    The bytes go to a temporary file in the same folder (same file system, so the rename is atomic), are
    fsync'ed, and then `os.replace` swaps it in. A crash or an exception mid-write leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict:
    """Loads a checkpoint written by `save_checkpoint` (on the CPU).

    Raises:
        CheckpointError: the file does not exist or is not a checkpoint dict with a "model" entry.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for a corrupt or foreign file
        raise CheckpointError(f"{path}: not a readable checkpoint ({error})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a maskrcnn checkpoint (no 'model' entry)")
    return state


def rng_state() -> dict:
    """The state of every random generator the run uses (python, numpy, torch CPU, every CUDA device)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_iteration(seed: int, iteration: int) -> None:
    """Seeds every generator from (seed, iteration).

    Why per iteration: the RPN and RoI samplers draw from torch's global generator, and whatever else ran in
    between (a periodic evaluation, a checkpoint reload) would shift their draws. Seeding each iteration makes the
    randomness of iteration i depend on i only, and resume exact (the data's augmentations are seeded per sample
    by the loader).
    """
    value = (seed * 1_000_003 + iteration) % (2**31)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # also seeds every CUDA device


# --------------------------------------------------------------------------------- optimiser and schedule


def build_optimizer(
    model: torch.nn.Module, *, name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters; norm weights and biases get no weight decay
    (decaying them only shrinks the scale that the normalisation re-learns)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"train.optimizer: unknown optimizer {name!r} (sgd | adamw)")


def lr_factor(
    iteration: int,
    *,
    max_iters: int,
    warmup_iters: int,
    warmup_factor: float,
    schedule: str,
    steps: tuple[int, ...],
    gamma: float,
) -> float:
    """Multiplier of the base learning rate at `iteration` (0-based): linear warm-up from `warmup_factor` to 1
    over `warmup_iters`, times a step decay (`gamma` at each of `steps`) or a cosine decay to 0 at `max_iters`."""
    if schedule == "step":
        decay = gamma ** sum(iteration >= step for step in steps)
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * min(iteration, max_iters) / max(max_iters, 1)))
    else:
        raise ValueError(f"train.schedule: unknown schedule {schedule!r} (step | cosine)")
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        decay *= warmup_factor * (1.0 - alpha) + alpha
    return decay


def build_scheduler(optimizer: torch.optim.Optimizer, **schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `lr_factor`; keyword arguments are those of `lr_factor` after `iteration`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda iteration: lr_factor(iteration, **schedule))


# ------------------------------------------------------------------------------------------- the loop


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; other names as given (a missing GPU is an error)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device: {name!r} requested but CUDA is not available")
    return device


def targets_to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in t.items()} for t in targets]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class MetricsLogger:
    """Appends JSON records to metrics.jsonl and, when tensorboard is installed, writes the same scalars there."""

    def __init__(self, *, out_dir: Path, enabled: bool) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tensorboard = SummaryWriter(log_dir=str(out_dir / "tb"))

    def drop_after(self, iteration: int) -> None:
        """Removes records past `iteration` (a resumed run repeats the iterations after its checkpoint)."""
        if self.enabled and self.path.is_file():
            lines = self.path.read_text().splitlines(keepends=True)
            self.path.write_text("".join(line for line in lines if json.loads(line)["iteration"] <= iteration))

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


@dataclass
class TrainResult:
    """What `train` leaves behind: the run directory, iterations done, the final evaluation (rank 0, None on the
    other ranks), whether the time budget stopped the run early, and the trained model (unwrapped from DDP) with
    its device."""

    out_dir: Path
    iterations: int
    evaluation: EvalResult | None
    stopped_early: bool
    model: torch.nn.Module
    device: torch.device


def mask_ap(result: EvalResult) -> float:
    """The number best.pt is chosen by: COCO mask AP (segm, IoU 0.5:0.95)."""
    return result.metrics["segm"]["AP"] or 0.0


def train(
    cfg: Config,
    *,
    model: torch.nn.Module | None = None,
    train_set=None,
    val_set=None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Trains `cfg.train.max_iters` iterations (or until `cfg.train.max_minutes`), evaluating on the way.

    Args:
        cfg: the whole config; `cfg.train.out_dir` is the run directory.
        model: None builds `build_model(cfg.model)`; any model with torchvision's calling convention works
            (the loss is the sum of every `loss_*` entry of its loss dict).
        train_set, val_set: None builds them with `build_dataset(cfg.data, "train" | "val")`.
        resume: continue from `out_dir/last.pt` (model, optimiser, schedule, iteration, random state).
        progress: show a tqdm bar.
    Returns:
        TrainResult.
    Raises:
        NonFiniteLossError: a loss term became NaN/inf; no step is taken with it and last.pt stays as it was.
        CheckpointError: `resume` without a readable last.pt.
    """
    tc = cfg.train
    if tc.num_threads is not None:
        torch.set_num_threads(tc.num_threads)
    out_dir = Path(tc.out_dir)
    dist_device = distributed.init_distributed()
    device = dist_device or resolve_device(tc.device)
    main = distributed.is_main()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")

    seed_iteration(tc.seed, 0)
    model = model if model is not None else build_model(cfg.model)
    model.to(device)
    train_set = train_set if train_set is not None else build_dataset(cfg.data, "train")
    val_set = val_set if val_set is not None else build_dataset(cfg.data, "val")
    optimizer = build_optimizer(model, name=tc.optimizer, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    scheduler = build_scheduler(
        optimizer, max_iters=tc.max_iters, warmup_iters=tc.warmup_iters, warmup_factor=tc.warmup_factor,
        schedule=tc.schedule, steps=tc.steps, gamma=tc.gamma,
    )
    start_iter = 0
    best_ap = -1.0
    if resume:
        state = load_checkpoint(out_dir / "last.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_iter = int(state["iteration"])
        best_ap = float(state.get("best_ap", -1.0))
        set_rng_state(state["rng"])
    if distributed.get_world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if device.type == "cuda":
        # cudnn.benchmark tunes every convolution once per input shape: a gain with one fixed canvas, a loss with
        # canvases that vary by batch (torchvision with variable sizes: about 20x fewer iterations, DESIGN.md)
        torch.backends.cudnn.benchmark = cfg.model.transform.fixed_canvas is not None

    loader = build_train_loader(
        train_set, batch_size=tc.batch_size, num_workers=cfg.data.num_workers,
        aspect_ratio_grouping=cfg.data.aspect_ratio_grouping, seed=tc.seed, rank=distributed.get_rank(),
        world_size=distributed.get_world_size(), start_iter=start_iter,
    )
    logger = MetricsLogger(out_dir=out_dir, enabled=main)
    logger.drop_after(start_iter)

    def checkpoint(iteration: int, name: str) -> None:
        if main:
            state = {
                "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "iteration": iteration, "rng": rng_state(),
                "config": config_to_dict(cfg), "best_ap": best_ap, "class_names": list(train_set.class_names),
            }
            save_checkpoint(state, out_dir / name)

    def run_evaluation(iteration: int) -> EvalResult | None:
        nonlocal best_ap
        result = None
        if main:
            result = evaluate_dataset(
                unwrap(model), val_set, batch_size=cfg.eval.batch_size, device=device, num_workers=cfg.data.num_workers,
                iou_thresh=cfg.eval.iou_thresh, max_images=cfg.eval.max_images, amp=tc.amp, out_dir=out_dir,
            )
            logger.log({"iteration": iteration, "eval": result.metrics})
            if mask_ap(result) > best_ap:
                best_ap = mask_ap(result)
                checkpoint(iteration, "best.pt")
        distributed.barrier()
        model.train()
        return result

    model.train()
    started = time.perf_counter()
    stopped_early = False
    window: dict[str, list[float]] = {}  # loss values since the last log record
    iteration = start_iter
    bar = tqdm(total=tc.max_iters, initial=start_iter, desc="train", unit="it", disable=not (progress and main),
               dynamic_ncols=True)
    try:
        while iteration < tc.max_iters:
            seed_iteration(tc.seed, iteration)
            images, targets = next(loader)
            images = images_to_model(images, device)
            targets = targets_to_device(targets, device)
            with autocast(device, tc.amp):
                loss_dict = model(images, targets)
            loss_dict = {k: v.float() for k, v in loss_dict.items() if k.startswith("loss")}
            total = sum(loss_dict.values())
            # One host sync per iteration: needed anyway for logging, and it stops a NaN before the step.
            values = dict(zip(loss_dict, torch.stack(list(loss_dict.values())).tolist()))
            bad = [name for name, value in values.items() if not math.isfinite(value)]
            if bad:
                raise NonFiniteLossError(
                    f"iteration {iteration}: loss term {bad[0]} is {values[bad[0]]} (all terms: "
                    + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                    + "); stopping, the last checkpoint is unchanged"
                )
            for name, value in values.items():
                window.setdefault(name, []).append(value)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if tc.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            iteration += 1
            bar.update(1)

            if iteration % tc.log_period == 0 or iteration == tc.max_iters:
                # The mean over the log period: single-iteration values are too noisy to read a curve from.
                means = {k: torch.tensor(sum(v) / len(v), device=device) for k, v in window.items()}
                reduced = {k: float(v) for k, v in distributed.reduce_loss_dict(means).items()}
                window.clear()
                record = {"iteration": iteration, "lr": optimizer.param_groups[0]["lr"],
                          "loss": sum(reduced.values()), **reduced, "time": time.perf_counter() - started}
                logger.log(record)
                bar.set_postfix({k.removeprefix("loss_"): f"{v:.3f}" for k, v in reduced.items()} | {"lr": f"{record['lr']:.2e}"})
            out_of_time = tc.max_minutes is not None and (time.perf_counter() - started) / 60.0 >= tc.max_minutes
            if distributed.get_world_size() > 1:  # every rank must stop at the same iteration
                flag = torch.tensor(float(out_of_time), device=device)
                torch.distributed.all_reduce(flag)
                out_of_time = bool(flag.item())
            if out_of_time and iteration < tc.max_iters:
                stopped_early = True
                break
            if tc.eval_period and iteration % tc.eval_period == 0 and iteration < tc.max_iters:
                run_evaluation(iteration)
            if tc.checkpoint_period and iteration % tc.checkpoint_period == 0:
                checkpoint(iteration, "last.pt")
        evaluation = run_evaluation(iteration)
        checkpoint(iteration, "last.pt")
    finally:
        bar.close()
        logger.close()
    return TrainResult(out_dir=out_dir, iterations=iteration, evaluation=evaluation, stopped_early=stopped_early,
                       model=unwrap(model), device=device)


def with_out_dir(cfg: Config, out_dir: str | Path) -> Config:
    """`cfg` with train.out_dir replaced."""
    return replace(cfg, train=replace(cfg.train, out_dir=str(out_dir)))

"""Training loop: SGD / AdamW, warm-up then step or cosine schedule, bf16 autocast, gradient clipping, logging,
periodic evaluation, atomic checkpoints, exact resume, and a clean stop on SIGINT / SIGTERM.

Run directory (written by rank 0 only, which holds its lock, `checkpoint.RunLock`, while training):
    config.yaml     the full config of the run
    metrics.jsonl   one JSON record per log period, {"iteration", "lr", "loss", "loss_*", "time"} with the losses
                    averaged over the period, and one per evaluation, {"iteration", "eval": {...metrics}}
    metrics.json    the last evaluation (plus detections.json, pr_curves.json)
    last.pt         checkpoint every checkpoint_period iterations, before every evaluation, at the end and when a
                    signal stops the run; best.pt: the weights of the best mask AP so far
    tb/             TensorBoard scalars when the tensorboard package is installed
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from maskrcnn.config import Config, ConfigError, config_to_dict, save_config
from maskrcnn.data import DatasetError, build_dataset, build_train_loader, dataset_categories
from maskrcnn.engine import distributed
from maskrcnn.engine.checkpoint import CheckpointError, RunLock, load_checkpoint, save_checkpoint
from maskrcnn.engine.common import autocast, images_to_model, resolve_device, targets_to_device
from maskrcnn.engine.evaluate import EvalResult, evaluate_dataset
from maskrcnn.engine.run_folder import RunFolder
from maskrcnn.engine.threads import ThreadProbe
from maskrcnn.errors import UserError
from maskrcnn.fileio import full_disk_as_error, read_jsonl, remove_temp_files, write_text_atomic
from maskrcnn.model import build_model
from maskrcnn.model.precision import PrecisionChoice
from maskrcnn.model.pretrained import WeightsError, load_state_dict_checked

log = logging.getLogger(__name__)

# train.precision auto: untimed, then timed steps of each precision, alternating (the thread probe's 5 untimed and 8
# timed steps per candidate, and a median of 8 as robust)
PRECISION_PROBE_STEPS = (3, 8)


class NonFiniteLossError(UserError, RuntimeError):
    """A loss became NaN or infinite (e.g. too high a train.lr); the message names the iteration and the loss term."""


def seed_iteration(seed: int, iteration: int) -> None:
    """Seeds every generator from (seed, iteration).

    Why per iteration: the RPN and RoI samplers draw from torch's global generator, and whatever else ran in
    between (a periodic evaluation, a checkpoint reload) would shift their draws. Seeding each iteration makes the
    randomness of iteration i depend on i only, and resume exact without storing any generator state in the
    checkpoint (the data's augmentations are seeded per sample by the loader).
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
    # fused: one kernel over all parameters; the default on a CPU is a Python loop over the ~100 tensors, which made
    # AdamW's step 38 ms of the demo's 300 ms iteration (8 ms fused)
    fused = all(param.device.type in ("cpu", "cuda") for param in decay + no_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused)
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


class TimeBudget:
    """Fits the schedule into the time budget `train.max_minutes`.

    Without a budget the schedule spans `max_iters`. With one, every log period measures the speed of the last
    iterations and sets the schedule's length, `planned_iters`, to the iterations that fit into the time left (at most
    `max_iters`): the cosine reaches zero, or the steps fall, as the budget ends, on a fast machine and on a slow one
    alike (a fixed 1900-iteration cosine stopped at 586 iterations with 80 % of its learning rate left on a machine 3x
    slower). The plan and the time spent go into the checkpoint, so a resumed run continues the same schedule with
    the time that was left.

    The speed that plans is the steady one, measured from `steady_from` on: the first iterations of a process pay
    start-up costs, and the thread probe runs some with a slower thread count (measured over them, a resumed run's
    first plan shrank and its learning rate jumped down). Before a steady measurement exists, the start-up's speed
    plans only when nothing better does: the first plans of a fresh run (a budget shorter than the start-up must end
    too), never the plan a resumed run brought from its checkpoint.
    """

    WINDOW = 100  # iterations the speed is measured over: smooths the noise, follows a change of machine load

    def __init__(self, *, max_iters: int, minutes: float | None) -> None:
        self.max_iters = max_iters
        self.seconds = None if minutes is None else 60.0 * minutes
        self.planned_iters = max_iters
        self.planned_steady = False  # planned_iters comes from a steady speed or from a checkpoint
        self.spent = 0.0  # seconds of training before this process started (a resumed run)
        self.started = time.perf_counter()
        self.steady = False  # the marks start at a steady iteration
        self.marks: collections.deque[tuple[int, float]] = collections.deque()  # (iteration, time) per log period

    def start(self, iteration: int) -> None:
        """Starts the clock at `iteration`, the first one of this process."""
        self.started = time.perf_counter()
        self.marks = collections.deque([(iteration, self.started)])
        self.steady = False

    def steady_from(self, iteration: int) -> None:
        """From `iteration` on, the speed is measured anew: the iterations before it paid start-up costs or ran with
        a thread count under test (`ThreadProbe.steady_iter`)."""
        self.marks = collections.deque([(iteration, time.perf_counter())])
        self.steady = True

    def elapsed(self) -> float:
        """Seconds of training so far, earlier processes of a resumed run included."""
        return self.spent + time.perf_counter() - self.started

    def out_of_time(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds

    def seconds_per_iteration(self) -> float | None:
        """Over the last WINDOW or more iterations (None before the first log period)."""
        (first, then), (last, now) = self.marks[0], self.marks[-1]
        return (now - then) / (last - first) if last > first else None

    def refit(self, iteration: int) -> None:
        """Records the time of `iteration` (call it every log period) and, with a budget, re-plans the schedule's
        length."""
        self.marks.append((iteration, time.perf_counter()))
        while len(self.marks) > 2 and self.marks[-1][0] - self.marks[1][0] >= self.WINDOW:
            self.marks.popleft()
        per_iteration = self.seconds_per_iteration()
        if self.seconds is None or per_iteration is None or (self.planned_steady and not self.steady):
            return
        fits = iteration + int((self.seconds - self.elapsed()) / per_iteration)
        self.planned_iters = max(iteration, min(self.max_iters, fits))  # no time left: the schedule ends here
        self.planned_steady = self.steady

    def state_dict(self) -> dict:
        return {"spent": self.elapsed(), "planned_iters": self.planned_iters}

    def load_state_dict(self, state: dict) -> None:
        """Continues a run: the time it spent and, under a budget, its plan (at most this run's max_iters; a run
        resumed with a larger max_iters and no budget trains to that)."""
        self.spent = float(state["spent"])
        if self.seconds is not None:
            self.planned_iters = min(int(state["planned_iters"]), self.max_iters)
            self.planned_steady = True


# ------------------------------------------------------------------------------------------- the loop


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class MetricsLogger:
    """Appends JSON records to metrics.jsonl and, with `tensorboard`, writes the same scalars to out_dir/tb."""

    def __init__(self, *, out_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.path = RunFolder(out_dir).metrics_jsonl
        self.enabled = enabled
        self.tensorboard = None
        if enabled and tensorboard:
            self.tensorboard = summary_writer()(log_dir=str(RunFolder(out_dir).tensorboard))

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


def sync_batchnorm(model: torch.nn.Module, *, enabled: bool, world_size: int,
                   device: torch.device) -> torch.nn.Module:
    """The model with its trainable BatchNorm layers turned into SyncBatchNorm when `enabled` in a distributed run
    (statistics over every process's images; FrozenBatchNorm and GroupNorm are left as they are).

    Raises:
        ConfigError: enabled on a CPU run with several processes (SyncBatchNorm synchronises GPU tensors only).
    """
    if not enabled or world_size == 1:
        return model
    if device.type != "cuda":
        raise ConfigError("train.sync_batchnorm: true needs CUDA (SyncBatchNorm synchronises GPU tensors); set it "
                          "false for CPU runs")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def format_duration(seconds: float) -> str:
    """'1h02m', '4m10s', '35s'."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@contextlib.contextmanager
def run_log(out_dir: Path, *, enabled: bool, to_terminal: bool):
    """While training, the `maskrcnn` logger's lines (training progress, evaluation, report) also go to
    out_dir/log.txt (appended: a resumed run continues it) and, with `to_terminal` and no handler set up by the
    caller (the command line sets one), to stdout."""
    logger = logging.getLogger("maskrcnn")
    handlers = []
    if enabled:
        handlers.append(logging.FileHandler(RunFolder(out_dir).log))
        handlers[-1].setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        if to_terminal and not logger.handlers:
            handlers.append(logging.StreamHandler(sys.stdout))
    level = logger.level
    if handlers and logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(level)


class StopSignals:
    """Turns the first SIGINT / SIGTERM into a request to stop after the current iteration (the trainer then saves
    last.pt and returns); a second one stops at once, as that signal would without this handler: SIGINT raises
    KeyboardInterrupt (exit status 130), SIGTERM raises SystemExit(143), the status a job scheduler expects. Within
    `stopping_at_once` (the final evaluation, when training is saved) the first one stops at once too. A context
    manager; outside the main thread it does nothing (Python delivers signals to the main thread only)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None  # the name of the signal that asked to stop
        self.at_once: str | None = None  # what a signal that stops at once prints (what is kept, how to go on)
        self._previous: dict = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @contextlib.contextmanager
    def stopping_at_once(self, message: str):
        """Within it, the first signal stops at once too, printing `message`."""
        self.at_once = message
        try:
            yield
        finally:
            self.at_once = None

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            # a DataLoader worker forked with this handler: the main process decides when to stop, so Ctrl-C (sent
            # to the whole process group) must not end the worker; SIGTERM keeps its default effect
            if signum == signal.SIGTERM:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        name = signal.Signals(signum).name
        if self.received is None and self.at_once is None:
            self.received = name
            print(f"\nmaskrcnn: {name}: saving last.pt after this iteration, then stopping "
                  f"(send it again to stop at once)", file=sys.stderr, flush=True)
            return
        print(f"\nmaskrcnn: {name}: {self.at_once or 'stopping at once; last.pt is the last checkpoint saved'}",
              file=sys.stderr, flush=True)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)


@dataclass
class TrainResult:
    """What `train` leaves behind: the run directory, iterations done, the final evaluation (rank 0, None on the
    other ranks and after a stop by signal), whether the time budget stopped the run early, the signal that
    stopped it (None: it ran to its end), and the trained model (unwrapped from DDP) with its device."""

    out_dir: Path
    iterations: int
    evaluation: EvalResult | None
    stopped_early: bool
    interrupted_by: str | None
    model: torch.nn.Module
    device: torch.device


def mask_ap(result: EvalResult) -> float:
    """The number best.pt is chosen by: COCO mask AP (segm, IoU 0.5:0.95)."""
    return result.metrics["segm"]["AP"] or 0.0


def check_validation_set(val_set) -> None:
    """Fails before the first iteration when the evaluation could not run: an empty validation split, or a first
    sample that cannot be read (a wrong folder, an undecodable image)."""
    if len(val_set) == 0:
        raise DatasetError("the validation split has no images: evaluation needs at least one (see the data "
                           "section of the config)")
    val_set[0]


def prepare_run_folder(cfg: Config) -> None:
    """Removes the temporary files of checkpoint writes that a kill interrupted and writes config.yaml. Call it
    while holding the folder's lock: another run's temporary files would be in use."""
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out_dir)
    save_config(cfg, RunFolder(out_dir).config)


def _build_model(cfg: Config) -> torch.nn.Module:
    """`build_model(cfg.model)`; weights the config names that cannot be read, fetched or do not fit are a
    ConfigError (the message names the setting or the file)."""
    try:
        return build_model(cfg.model)
    except WeightsError as error:
        raise ConfigError(str(error)) from error  # the cause tells a failed download apart


class Trainer:
    """One training run: `__init__` sets it up (model, data, optimiser, schedule, resume), `run` loops over `step`
    with logging, periodic checkpoints and evaluations, and the stop conditions. Use it through `train`."""

    def __init__(self, cfg: Config, *, device: torch.device, model: torch.nn.Module | None, train_set, val_set,
                 resume: bool) -> None:
        tc = self.tc = cfg.train
        self.cfg, self.device, self.main = cfg, device, distributed.is_main()
        self.out_dir = Path(tc.out_dir)
        self.folder = RunFolder(tc.out_dir)
        seed_iteration(tc.seed, 0)
        model = model if model is not None else _build_model(cfg)
        model.to(device)
        self.train_set = train_set if train_set is not None else build_dataset(cfg.data, "train")
        self.val_set = val_set if val_set is not None else build_dataset(cfg.data, "val")
        if self.main:
            check_validation_set(self.val_set)
        self.optimizer = build_optimizer(model, name=tc.optimizer, lr=tc.lr, momentum=tc.momentum,
                                         weight_decay=tc.weight_decay)
        self.budget = TimeBudget(max_iters=tc.max_iters, minutes=tc.max_minutes)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.start_iter = self._resume(model) if resume else 0
        probed = tc.num_threads == "auto" and device.type == "cpu"
        self.threads = ThreadProbe(self.start_iter, None if probed else (torch.get_num_threads(),))
        # CPU steps in fp32 or bf16 (train.precision; auto times both on the first steps, alternating, so that
        # the thread probe's candidates see both alike); CUDA steps follow train.amp
        skip, probe = PRECISION_PROBE_STEPS
        self.precision = PrecisionChoice(tc.precision if device.type == "cpu" else "fp32", key="train.precision",
                                         skip_calls=skip, probe_calls=probe)
        # the first iteration that runs as training goes on, after both probes: the budget measures from there
        precision_probe = 0 if self.precision.chosen is not None else 2 * (skip + probe)
        self.steady_iter = max(self.threads.steady_iter, self.start_iter + precision_probe)
        self.best_ap = self._best_ap() if resume else -1.0
        if self.main:  # only now: a failed check or resume leaves the run folder as it was
            prepare_run_folder(cfg)
        self.saved_at = self.start_iter if resume else None  # the iteration last.pt holds
        if distributed.get_world_size() > 1:
            model = sync_batchnorm(model, enabled=tc.sync_batchnorm, world_size=distributed.get_world_size(),
                                   device=device)
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.model = model
        if device.type == "cuda":
            # cudnn.benchmark tunes every convolution once per input shape: a gain with one fixed canvas, a loss
            # with canvases that vary by batch (torchvision with variable sizes: about 20x fewer iterations)
            torch.backends.cudnn.benchmark = cfg.model.transform.fixed_canvas is not None
        self.loader = build_train_loader(
            self.train_set, batch_size=tc.batch_size, num_workers=cfg.data.num_workers,
            aspect_ratio_grouping=cfg.data.aspect_ratio_grouping, seed=tc.seed, rank=distributed.get_rank(),
            world_size=distributed.get_world_size(), start_iter=self.start_iter,
        )
        self.logger = MetricsLogger(out_dir=self.out_dir, enabled=self.main, tensorboard=tc.tensorboard)
        self.logger.drop_after(self.start_iter)
        self.window: dict[str, list[float]] = {}  # loss values since the last log record

    def lr_factor(self, iteration: int) -> float:
        """`lr_factor` over the schedule's planned length (`TimeBudget`): the step milestones scale with it, and the
        warm-up takes at most half of it (a budget shorter than the warm-up ends at lr 0 too, after a shorter
        warm-up, instead of in the middle of the warm-up)."""
        tc, planned = self.tc, self.budget.planned_iters
        steps = tuple(round(step * planned / tc.max_iters) for step in tc.steps)
        return lr_factor(iteration, max_iters=planned, warmup_iters=min(tc.warmup_iters, planned // 2),
                         warmup_factor=tc.warmup_factor, schedule=tc.schedule, steps=steps, gamma=tc.gamma)

    def _resume(self, model: torch.nn.Module) -> int:
        """Loads last.pt into the model, optimiser and schedule; returns its iteration.

        Raises:
            CheckpointError: last.pt is missing or unreadable, lacks what a resume needs, or its weights or
                optimiser state do not fit the config (e.g. another number of classes).
        """
        path = self.folder.last
        state = load_checkpoint(path)
        missing = [key for key in ("optimizer", "scheduler", "iteration") if key not in state]
        if missing:
            raise CheckpointError(f"{path}: cannot resume from it, it has no {missing[0]} (not a last.pt written by "
                                  f"training)")
        saved_optimizer = state.get("config", {}).get("train", {}).get("optimizer", self.tc.optimizer)
        if saved_optimizer != self.tc.optimizer:  # another optimizer's state loads silently, then fails mid-step
            raise CheckpointError(f"{path}: trained with train.optimizer={saved_optimizer}, the config says "
                                  f"{self.tc.optimizer}; resume with the same optimizer")
        try:
            load_state_dict_checked(model, state["model"], str(path), hint="the model of the config")
        except WeightsError as error:
            raise CheckpointError(str(error)) from None
        if "budget" in state:  # the schedule's planned length and the time already spent
            self.budget.load_state_dict(state["budget"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError) as error:  # parameter groups of other sizes, another optimizer
            raise CheckpointError(f"{path}: its optimiser state does not fit train.optimizer of the config "
                                  f"({str(error).strip().splitlines()[-1].strip()[:200]})") from None
        return int(state["iteration"])

    def _best_ap(self) -> float:
        """The mask AP of the run's best.pt (-1 without one): a resumed run replaces it only by a better model."""
        path = self.folder.best
        return float(load_checkpoint(path)["best_ap"]) if self.main and path.is_file() else -1.0

    def _state(self, iteration: int) -> dict:
        """What every checkpoint holds: weights, iteration, config and the classes as [{"id", "name"}] per label
        (tensors and plain values)."""
        return {"model": unwrap(self.model).state_dict(), "iteration": iteration, "config": config_to_dict(self.cfg),
                "categories": dataset_categories(self.train_set)}

    def save(self, iteration: int) -> None:
        """last.pt at `iteration`, with the optimiser and schedule to resume from (rank 0; once per iteration)."""
        if self.main and self.saved_at != iteration:
            state = self._state(iteration) | {"optimizer": self.optimizer.state_dict(),
                                              "scheduler": self.scheduler.state_dict(),
                                              "budget": self.budget.state_dict()}
            save_checkpoint(state, self.folder.last)
        self.saved_at = iteration

    def evaluate(self, iteration: int) -> EvalResult | None:
        """Evaluates on the validation set, sharded across the ranks (rank 0 gathers and scores), logs the metrics
        and writes best.pt when the mask AP improved. Returns the evaluation (None on the other ranks)."""
        ec = self.cfg.eval
        result = evaluate_dataset(
            unwrap(self.model), self.val_set, batch_size=ec.batch_size, device=self.device,
            num_workers=self.cfg.data.num_workers, iou_thresh=ec.iou_thresh, max_images=ec.max_images,
            amp=self.tc.amp, out_dir=self.out_dir, num_vis=ec.num_vis, mask_ceiling=ec.mask_ceiling,
        )
        if self.main:
            self.logger.log({"iteration": iteration, "eval": result.metrics})
            if mask_ap(result) > self.best_ap:
                self.best_ap = mask_ap(result)
                save_checkpoint(self._state(iteration) | {"best_ap": self.best_ap}, self.folder.best)
        distributed.barrier()
        return result

    def step(self, iteration: int) -> dict[str, float]:
        """One iteration: a batch, the losses, one optimiser and schedule step. Returns the loss values.

        Raises:
            NonFiniteLossError: before the step, which is not taken.
        """
        tc = self.tc
        seed_iteration(tc.seed, iteration)
        images, targets = next(self.loader)
        images = images_to_model(images, self.device)
        targets = targets_to_device(targets, self.device)
        with autocast(self.device, tc.amp, cpu_bf16=self.precision.bf16()):
            loss_dict = self.model(images, targets)
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
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if tc.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return values

    def log(self, iteration: int, values: dict[str, float]) -> None:
        """Collects the losses of one iteration; every log period (and at the end) writes their means to
        metrics.jsonl and a progress line to the log, and re-plans the schedule's length (`TimeBudget`)."""
        for name, value in values.items():
            self.window.setdefault(name, []).append(value)
        if iteration % self.tc.log_period and iteration != self.budget.planned_iters:
            return
        # The mean over the log period: single-iteration values are too noisy to read a curve from.
        means = {k: torch.tensor(sum(v) / len(v), device=self.device) for k, v in self.window.items()}
        reduced = {k: float(v) for k, v in distributed.reduce_loss_dict(means).items()}
        self.window.clear()
        record = {"iteration": iteration, "lr": self.optimizer.param_groups[0]["lr"], "loss": sum(reduced.values()),
                  **reduced, "time": self.budget.elapsed()}
        self.logger.log(record)
        self.budget.refit(iteration)
        if distributed.get_world_size() > 1:  # every rank must follow the same schedule: the shortest plan
            planned = torch.tensor(self.budget.planned_iters, device=self.device)
            torch.distributed.all_reduce(planned, op=torch.distributed.ReduceOp.MIN)
            self.budget.planned_iters = int(planned.item())
        if self.main:
            log.info(self.progress_line(record))

    def progress_line(self, record: dict) -> str:
        """'iter 120/600  loss 1.234 (rpn_cls 0.050 ... mask 0.500)  lr 1.20e-02  13.2 images/s  ETA 4m10s'."""
        terms = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in record.items() if k.startswith("loss_"))
        line = (f"iter {record['iteration']}/{self.budget.planned_iters}  loss {record['loss']:.3f} ({terms})  "
                f"lr {record['lr']:.2e}")
        per_iteration = self.budget.seconds_per_iteration()
        if per_iteration is not None:
            images = self.tc.batch_size * distributed.get_world_size() / per_iteration
            left = (self.budget.planned_iters - record["iteration"]) * per_iteration
            line += f"  {images:.1f} images/s  ETA {format_duration(left)}"
        return line

    def should_stop(self, stop: StopSignals) -> bool:
        """True when a signal asked to stop or the time budget is spent, on every rank alike."""
        flag = self.budget.out_of_time() or stop.received is not None
        if distributed.get_world_size() > 1:  # every rank must stop at the same iteration
            reduced = torch.tensor(float(flag), device=self.device)
            torch.distributed.all_reduce(reduced)
            flag = bool(reduced.item())
        return flag

    def checkpoint_and_evaluate(self, iteration: int) -> None:
        """The periodic work after an iteration: last.pt every checkpoint period and, saved first so that a failing
        evaluation loses nothing, before every evaluation."""
        tc = self.tc
        due_eval = bool(tc.eval_period) and iteration % tc.eval_period == 0 and iteration < self.budget.planned_iters
        if due_eval or (tc.checkpoint_period and iteration % tc.checkpoint_period == 0):
            self.save(iteration)
        if due_eval:
            self.evaluate(iteration)

    def announce(self) -> None:
        """The run's set-up, once at the start: iterations, device, total batch and the lr rule, the budget."""
        tc, world = self.tc, distributed.get_world_size()
        log.info(f"training {'up to ' if tc.max_minutes is not None else ''}{tc.max_iters} iterations on "
                 f"{self.device} from iteration {self.start_iter}: {world} "
                 f"process{'es' if world > 1 else ''} x {tc.batch_size} images = total batch {world * tc.batch_size}; "
                 f"train.lr {tc.lr:g} is for this total batch (linear scaling rule: k times the total batch, k times "
                 f"the lr)")
        if tc.max_minutes is not None:
            log.info(f"time budget {tc.max_minutes:g} min ({format_duration(self.budget.elapsed())} spent): the "
                     f"schedule's length is fitted to the measured speed")
        log.info(f"log: {self.folder.log}" + (f", TensorBoard: {self.folder.tensorboard}" if tc.tensorboard else ""))

    def run(self, stop: StopSignals) -> TrainResult:
        """Trains to the end of the schedule, the time budget or a stop signal; saves last.pt, then evaluates (not
        after a signal: the user asked to stop; a signal during the evaluation stops it at once, with the command
        that evaluates last.pt)."""
        self.model.train()
        self.budget.start(self.start_iter)
        if self.main:
            self.announce()
        stopped_early = False
        iteration = self.start_iter
        try:
            while iteration < self.budget.planned_iters:
                self.threads.before(iteration)
                started = time.perf_counter()
                values = self.step(iteration)
                seconds = time.perf_counter() - started
                self.threads.after(iteration, seconds)
                self.precision.record(seconds)
                iteration += 1
                if iteration == self.steady_iter:
                    self.budget.steady_from(iteration)
                self.log(iteration, values)
                if self.should_stop(stop) and iteration < self.budget.planned_iters:
                    stopped_early = stop.received is None
                    break
                self.checkpoint_and_evaluate(iteration)
            self.save(iteration)
            if self.main:
                log.info(f"trained {iteration} iterations in {format_duration(self.budget.elapsed())}"
                         + (" (the time budget ran out)" if stopped_early else ""))
            evaluation = None
            if not stop.received:
                last = self.out_dir / "last.pt"
                with stop.stopping_at_once(f"stopping the final evaluation; {last} holds the {iteration} iterations "
                                           f"trained: evaluate it and make its report with: maskrcnn evaluate {last}"):
                    evaluation = self.evaluate(iteration)
        finally:
            self.logger.close()
        return TrainResult(out_dir=self.out_dir, iterations=iteration, evaluation=evaluation,
                           stopped_early=stopped_early, interrupted_by=stop.received, model=unwrap(self.model),
                           device=self.device)


def train(
    cfg: Config,
    *,
    model: torch.nn.Module | None = None,
    train_set=None,
    val_set=None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Trains `cfg.train.max_iters` iterations (or until `cfg.train.max_minutes`, or a SIGINT / SIGTERM),
    evaluating on the way.

    Args:
        cfg: the whole config; `cfg.train.out_dir` is the run directory.
        model: None builds `build_model(cfg.model)`; any model with torchvision's calling convention works
            (the loss is the sum of every `loss_*` entry of its loss dict).
        train_set, val_set: None builds them with `build_dataset(cfg.data, "train" | "val")`.
        resume: continue from `out_dir/last.pt` (model, optimiser, schedule, iteration).
        progress: also print the progress lines (the `maskrcnn` logger's) to stdout when no handler is set up for
            that logger; they always go to out_dir/log.txt.
    Returns:
        TrainResult.
    Raises:
        NonFiniteLossError: a loss term became NaN/inf; no step is taken with it and last.pt stays as it was.
        CheckpointError: `resume` without a readable last.pt, or weights that became NaN/inf (never saved).
        RunLockedError: another live process trains in `out_dir`.
        DatasetError: the validation set is empty or its first sample unreadable (checked before training).
        DiskFullError: no space left in `out_dir`; the checkpoints written before are kept.
    """
    tc = cfg.train
    if isinstance(tc.num_threads, int):  # auto: the trainer's ThreadProbe chooses
        torch.set_num_threads(tc.num_threads)
    device = distributed.init_distributed() or resolve_device(tc.device)
    lock = RunLock(tc.out_dir) if distributed.is_main() else contextlib.nullcontext()
    # enable_grad: a caller (e.g. an evaluation before) may have turned gradients off for the whole thread
    with lock, StopSignals() as stop, torch.enable_grad(), full_disk_as_error(tc.out_dir):
        trainer = Trainer(cfg, device=device, model=model, train_set=train_set, val_set=val_set, resume=resume)
        with run_log(trainer.out_dir, enabled=trainer.main, to_terminal=progress):
            return trainer.run(stop)

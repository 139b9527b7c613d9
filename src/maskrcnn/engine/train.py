"""The training loop: one step (bf16 autocast, gradient clipping, a NaN check), logging, periodic evaluation,
atomic checkpoints, exact resume and a clean stop on SIGINT / SIGTERM. The optimiser, schedule and time budget are
in `schedule`, the signals in `stop_signals`, the metrics records in `train_log`.

The run directory's files (rank 0 writes them, holding the folder's `checkpoint.RunLock`): `run_folder`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from maskrcnn.config import Config, ConfigError, config_to_dict, save_config
from maskrcnn.data import DatasetError, build_dataset, build_train_loader, dataset_categories
from maskrcnn.engine import distributed
from maskrcnn.engine.checkpoint import CheckpointError, RunLock, load_checkpoint, load_resume_checkpoint, save_checkpoint
from maskrcnn.engine.common import (autocast, cuda_autocast, images_to_model, resolve_device, seed_iteration,
                                    targets_to_device)
from maskrcnn.engine.distributed import sync_batchnorm, unwrap
from maskrcnn.engine.evaluate import EvalResult, evaluate_dataset
from maskrcnn.engine.run_folder import RunFolder
from maskrcnn.engine.schedule import Patience, TimeBudget, build_optimizer, lr_factor
from maskrcnn.engine.stop_signals import StopSignals
from maskrcnn.engine.threads import ThreadProbe
from maskrcnn.engine.train_log import MetricsLogger, announce, format_duration, progress_line
from maskrcnn.errors import UserError
from maskrcnn.fileio import full_disk_as_error, remove_temp_files
from maskrcnn.logs import run_log
from maskrcnn.model import build_model
from maskrcnn.model.precision import PrecisionChoice
from maskrcnn.model.pretrained import WeightsError, load_state_dict_checked

log = logging.getLogger(__name__)

# train.precision auto: untimed, then timed steps of each precision, alternating (the thread probe's 5 untimed and 8
# timed steps per candidate, and a median of 8 as robust)
PRECISION_PROBE_STEPS = (3, 8)


class NonFiniteLossError(UserError, RuntimeError):
    """A loss became NaN or infinite (e.g. too high a train.lr); the message names the iteration and the loss term."""


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
        self.patience = Patience(tc.patience, eval_period=tc.eval_period, budget=self.budget,
                                 best=self._best() if resume else None, iteration=self.start_iter)
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
        self.logger = MetricsLogger(path=self.folder.metrics_jsonl, enabled=self.main,
                                    tensorboard_dir=self.folder.tensorboard if tc.tensorboard else None)
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
        state = load_resume_checkpoint(path, optimizer=self.tc.optimizer)
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

    def _best(self) -> dict | None:
        """The run's best.pt (None without one): a resumed run replaces it only by a better model (`Patience`)."""
        path = self.folder.best
        return load_checkpoint(path) if self.main and path.is_file() else None

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
        """Evaluates on the validation set, sharded across the ranks (rank 0 gathers and scores), logs the metrics,
        writes best.pt when the mask AP improved and ends the schedule early when train.patience ran out (`Patience`;
        every rank follows). Returns the evaluation (None on the other ranks)."""
        ec = self.cfg.eval
        result = evaluate_dataset(
            unwrap(self.model), self.val_set, batch_size=ec.batch_size, device=self.device,
            num_workers=self.cfg.data.num_workers, iou_thresh=ec.iou_thresh, max_images=ec.max_images,
            amp=cuda_autocast(self.cfg.model.precision), out_dir=self.out_dir, num_vis=ec.num_vis,
            mask_ceiling=ec.mask_ceiling,
        )
        if self.main:
            self.logger.log({"iteration": iteration, "eval": result.metrics})
            if self.patience.record(mask_ap(result), iteration):
                save_checkpoint(self._state(iteration) | {"best_ap": self.patience.best_ap}, self.folder.best)
        self.budget.planned_iters = int(self.agreed(self.budget.planned_iters, "MIN"))  # rank 0's end; a barrier too
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
        self.budget.planned_iters = int(self.agreed(self.budget.planned_iters, "MIN"))  # one schedule: the shortest
        if self.main:
            log.info(self.progress_line(record))

    def progress_line(self, record: dict) -> str:
        """`train_log.progress_line` of a log record, with this run's plan and speed."""
        return progress_line(record, planned_iters=self.budget.planned_iters,
                             seconds_per_iteration=self.budget.seconds_per_iteration(),
                             images_per_iteration=self.tc.batch_size * distributed.get_world_size())

    def should_stop(self, stop: StopSignals) -> bool:
        """True when a signal asked to stop or the time budget is spent, on every rank alike."""
        flag = self.budget.out_of_time() or stop.received is not None
        return bool(self.agreed(float(flag), "SUM"))  # every rank stops at the same iteration

    def agreed(self, value: float, op: str) -> float:
        """`value` reduced over the ranks by `torch.distributed.ReduceOp.<op>`, on every rank; in one process itself."""
        if distributed.get_world_size() == 1:
            return value
        reduced = torch.tensor(value, device=self.device)
        torch.distributed.all_reduce(reduced, op=getattr(torch.distributed.ReduceOp, op))
        return reduced.item()

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
        """The run's set-up, once at the start (`train_log.announce`)."""
        announce(self.tc, device=self.device, start_iter=self.start_iter, world_size=distributed.get_world_size(),
                 spent=self.budget.elapsed(), folder=self.folder)

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
                last = self.folder.last
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
    overwrite: bool = False,
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
        overwrite: replace an earlier run in `out_dir`; without it or `resume`, a folder that holds one is refused.
            Checked under the folder's lock: of two trainings started into one folder, the second is refused
            (locked, or the first one's run is there by then) instead of replacing the first one's files.
        progress: also print the progress lines (the `maskrcnn` logger's) to stdout when no handler is set up for
            that logger; they always go to out_dir/log.txt.
    Returns:
        TrainResult.
    Raises:
        NonFiniteLossError: a loss term became NaN/inf; no step is taken with it and last.pt stays as it was.
        CheckpointError: `resume` without a readable last.pt, or weights that became NaN/inf (never saved).
        RunLockedError: another live process trains in `out_dir`.
        UserError: `out_dir` holds an earlier run and neither `resume` nor `overwrite` is given.
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
        if distributed.is_main():
            RunFolder(tc.out_dir).check_new_run(resume=resume, overwrite=overwrite)
        trainer = Trainer(cfg, device=device, model=model, train_set=train_set, val_set=val_set, resume=resume)
        with run_log(trainer.folder.log if trainer.main else None, to_terminal=progress):
            return trainer.run(stop)

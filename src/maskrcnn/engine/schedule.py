"""The optimiser and the learning-rate schedule of training, and the time budget that fits the schedule's length
to the measured speed (`train.max_minutes`).
"""

from __future__ import annotations

import collections
import math
import time

import torch


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
        if iteration >= self.planned_iters:  # the schedule has annealed: more iterations would train at lr 0
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

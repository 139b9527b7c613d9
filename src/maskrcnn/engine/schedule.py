"""The optimiser and the learning-rate schedule of training, the time budget that fits the schedule's length to
the measured speed (`train.max_minutes`), and early stopping, which ends it sooner (`train.patience`).
"""

from __future__ import annotations

import collections
import logging
import math
import time

import torch

log = logging.getLogger(__name__)


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
        self.end: int | None = None  # the iteration early stopping ends the schedule at (`end_at`); None: not ended

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

    def end_at(self, iteration: int) -> None:
        """Ends the schedule at `iteration` at the latest (early stopping, `Patience`): the plan shrinks to it, so that
        the schedule anneals by then, as when the time runs out, and no later refit plans past it. A plan that ends
        sooner already stays as it is: this never makes a plan longer."""
        self.end = iteration if self.end is None else min(self.end, iteration)
        self.max_iters = min(self.max_iters, iteration)
        self.planned_iters = min(self.planned_iters, iteration)

    def state_dict(self) -> dict:
        state = {"spent": self.elapsed(), "planned_iters": self.planned_iters}
        return state if self.end is None else state | {"end": self.end}

    def load_state_dict(self, state: dict) -> None:
        """Continues a run: the time it spent and, under a budget, its plan (at most this run's max_iters; a run
        resumed with a larger max_iters and no budget trains to that), and the end early stopping set, if any."""
        self.spent = float(state["spent"])
        if self.seconds is not None:
            self.planned_iters = min(int(state["planned_iters"]), self.max_iters)
            self.planned_steady = True
        if "end" in state:
            self.end_at(int(state["end"]))


class Patience:
    """Early stopping, `train.patience`: counts the evaluations since the best validation mask AP (the one best.pt
    holds) and, when `patience` of them in a row brought no better one, ends the schedule after a short tail through
    `TimeBudget.end_at`. The run does not stop at the learning rate it had: the schedule is refitted to the shorter
    length, as the time budget refits it, so the cosine anneals to 0 (the steps fall) by the tail's end.

    `patience` 0 or None: off (the evaluations are counted, the schedule is left alone).
    """

    # The tail, as a share of the iterations trained: the last step of the 1x schedule (lr x 0.01) is 1/9 of it
    TAIL = 0.1

    def __init__(self, patience: int | None, *, eval_period: int, budget: TimeBudget, best: dict | None = None,
                 iteration: int = 0) -> None:
        """`best`: a resumed run's best.pt ({"best_ap", "iteration", ...}; None: no evaluation yet) and `iteration`
        the one it resumes at: the evaluations since best.pt's (every `eval_period`) count as without improvement."""
        self.patience, self.budget = patience or 0, budget
        self.best_ap = -1.0 if best is None else float(best["best_ap"])
        self.best_iter = None if best is None else int(best["iteration"])
        self.waited = 0  # evaluations since the best one
        if best is not None and eval_period:
            self.waited = iteration // eval_period - self.best_iter // eval_period

    def record(self, ap: float, iteration: int) -> bool:
        """Counts the evaluation at `iteration` with mask AP `ap`; when patience runs out with it, ends the schedule
        after a tail of TAIL x `iteration` (at least 1) and logs why (not at the final evaluation of a run that the
        time budget stopped: it has ended). Returns True when `ap` is the best so far (the model best.pt should
        hold)."""
        if ap > self.best_ap:
            self.best_ap, self.best_iter, self.waited = ap, iteration, 0
            return True
        self.waited += 1
        end = iteration + max(1, int(self.TAIL * iteration))
        ran_out = bool(self.patience) and self.waited >= self.patience and not self.budget.out_of_time()
        if ran_out and end < self.budget.planned_iters:
            self.budget.end_at(end)
            log.info(f"early stopping (train.patience {self.patience}): {self.waited} evaluations without a better "
                     f"mask AP than {self.best_ap:.4f} of iteration {self.best_iter}; the schedule anneals to its "
                     f"end at iteration {end}, where the run stops")
        return False

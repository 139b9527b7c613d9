"""`train.num_threads: auto`: the CPU thread count of training, chosen by timing the training step.

Why measured: on the project's idle 2-core VM the demo's step took 0.28 s with 2 threads and 0.31 s with 1; with
one core kept busy by another process, 0.48 s with 2 (spinning OpenMP threads wait for the busy core) and 0.34 s
with 1, and 2.4 s against 0.3 s under a load average of 10. No fixed setting is right on both, and a user's
machine may be either. So the first iterations after start-up run PROBE_ITERS
steps with every candidate count (all cores, then 1), and training goes on with the one whose median step was
shortest. Every training run probes again, a second one in the same process too (a resumed run may be on
another machine, or under another load).
"""

from __future__ import annotations

import logging
import os
import statistics

import torch

log = logging.getLogger(__name__)


def available_cores() -> int:
    """The CPU cores this process may run on: its affinity where the platform has one (a container's or taskset's
    limit), else every core. Not torch.get_num_threads(): that is the count an earlier probe in this process chose,
    and a later training run would never try more."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class ThreadProbe:
    """Times the training step under each candidate thread count, then keeps the fastest.

    Call `before(iteration)` before every step and `after(iteration, seconds)` with its duration; both do nothing
    once the choice is made.

    Args:
        start_iter: the first iteration of this process; the SKIP_ITERS iterations from it are not timed (first-use
            costs: allocations, oneDNN primitives, the speed layer's layout timing).
        candidates: thread counts to try, in order; None: one per core available to this process (`available_cores`)
            and 1. With a single candidate nothing is probed: training runs with it (a fixed train.num_threads, or a
            GPU run).
    """

    SKIP_ITERS = 5  # untimed iterations at start-up
    PROBE_ITERS = 8  # timed iterations per candidate: the median of 8 ignores one or two outliers

    def __init__(self, start_iter: int, candidates: tuple[int, ...] | None = None) -> None:
        self.candidates = candidates or tuple(dict.fromkeys((available_cores(), 1)))
        self.first = start_iter + self.SKIP_ITERS  # the first timed iteration
        self.times: dict[int, list[float]] = {count: [] for count in self.candidates}
        self.chosen: int | None = self.candidates[0] if len(self.candidates) == 1 else None
        # the first iteration that runs as training goes on: after the untimed start-up and the probe
        self.steady_iter = self.first + (0 if self.chosen is not None else len(self.candidates) * self.PROBE_ITERS)
        torch.set_num_threads(self.candidates[0])

    def _candidate(self, iteration: int) -> int | None:
        """The thread count probed at `iteration` (None before or after the probe)."""
        slot = (iteration - self.first) // self.PROBE_ITERS
        return self.candidates[slot] if 0 <= slot < len(self.candidates) else None

    def before(self, iteration: int) -> None:
        if self.chosen is None and (count := self._candidate(iteration)) is not None:
            torch.set_num_threads(count)

    def after(self, iteration: int, seconds: float) -> None:
        if self.chosen is not None or (count := self._candidate(iteration)) is None:
            return
        self.times[count].append(seconds)
        if iteration == self.first + len(self.candidates) * self.PROBE_ITERS - 1:
            medians = {count: statistics.median(times) for count, times in self.times.items()}
            self.chosen = min(medians, key=medians.get)
            torch.set_num_threads(self.chosen)
            measured = ", ".join(f"{count} thread{'s' * (count > 1)} {median:.3f} s" for count, median in
                                 medians.items())
            log.info(f"threads: median training step with {measured}: training with {self.chosen}")

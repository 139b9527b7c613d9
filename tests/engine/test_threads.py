"""train.num_threads: auto — the thread count is chosen by timing the first steps with each candidate."""

from __future__ import annotations

import pytest
import torch

from maskrcnn.engine.threads import ThreadProbe
from maskrcnn.engine.train import train


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_probe(probe: ThreadProbe, start: int, seconds_per_count: dict[int, float], steps: int) -> list[int]:
    """Drives `probe` over `steps` iterations; returns the thread count each iteration ran with."""
    used = []
    for iteration in range(start, start + steps):
        probe.before(iteration)
        used.append(torch.get_num_threads())
        probe.after(iteration, seconds_per_count[torch.get_num_threads()])
    return used


def test_probe_keeps_the_faster_count_after_timing_each_on_its_own_iterations():
    skip, probe_iters = ThreadProbe.SKIP_ITERS, ThreadProbe.PROBE_ITERS
    # a busy machine: 2 threads spin against another process, 1 thread is faster
    probe = ThreadProbe(start_iter=30, candidates=(2, 1))
    used = run_probe(probe, 30, {2: 2.4, 1: 0.3}, skip + 2 * probe_iters + 5)
    assert used == [2] * (skip + probe_iters) + [1] * (probe_iters + 5)
    assert probe.chosen == 1 and probe.times == {2: [2.4] * probe_iters, 1: [0.3] * probe_iters}
    # an idle machine: 2 threads win, and training goes back to them after the probe
    probe = ThreadProbe(start_iter=0, candidates=(2, 1))
    used = run_probe(probe, 0, {2: 0.19, 1: 0.27}, skip + 2 * probe_iters + 5)
    assert used == [2] * (skip + probe_iters) + [1] * probe_iters + [2] * 5
    assert probe.chosen == 2


def test_probe_uses_the_median_so_one_slow_step_does_not_decide():
    probe = ThreadProbe(start_iter=0, candidates=(2, 1))
    first = ThreadProbe.SKIP_ITERS
    for iteration in range(first + 2 * ThreadProbe.PROBE_ITERS):
        probe.before(iteration)
        seconds = 0.2 if torch.get_num_threads() == 2 else 0.25
        probe.after(iteration, 5.0 if iteration == first else seconds)  # one 5 s hiccup on the 2-thread side
    assert probe.chosen == 2


def test_one_candidate_is_no_probe():
    probe = ThreadProbe(start_iter=0, candidates=(3,))
    assert probe.chosen == 3 and run_probe(probe, 0, {3: 1.0}, 30) == [3] * 30


def test_auto_threads_in_training_logs_the_choice(tmp_path, tiny_config, caplog):
    cfg = tiny_config(tmp_path / "run", "train.num_threads=auto", "train.max_iters=22", "train.log_period=22")
    torch.set_num_threads(2)
    with caplog.at_level("INFO", logger="maskrcnn"):
        train(cfg, progress=False)
    chosen = [line for line in caplog.messages if line.startswith("threads: median training step with 2 threads")]
    assert len(chosen) == 1 and chosen[0].split()[-1] in ("1", "2")
    assert torch.get_num_threads() == int(chosen[0].split()[-1])

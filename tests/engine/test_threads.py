"""train.num_threads: auto — the thread count is chosen by timing the first steps with each candidate."""

from __future__ import annotations

import os

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
    assert probe.steady_iter == 30 + skip + 2 * probe_iters  # the first iteration with the chosen count
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
    assert probe.steady_iter == ThreadProbe.SKIP_ITERS  # only the untimed start-up before the steady speed


def test_candidates_are_the_cores_of_the_process_not_the_count_an_earlier_probe_chose(monkeypatch):
    """A first training in this process chose 1 thread: a second one still tries one per core, then 1."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)  # e.g. taskset -c 0,2,5
    first = ThreadProbe(start_iter=0)
    assert first.candidates == (3, 1)
    run_probe(first, 0, {3: 2.4, 1: 0.3}, ThreadProbe.SKIP_ITERS + 2 * ThreadProbe.PROBE_ITERS)
    assert first.chosen == 1 and torch.get_num_threads() == 1
    assert ThreadProbe(start_iter=0).candidates == (3, 1)
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows: every core
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert ThreadProbe(start_iter=0).candidates == (4, 1)


def test_auto_threads_in_training_logs_the_choice(tmp_path, tiny_config, caplog, monkeypatch):
    # 1 untimed step, then 2 timed steps with 2 threads and 2 with 1: the choice is made at iteration 4 of 6
    monkeypatch.setattr(ThreadProbe, "SKIP_ITERS", 1)
    monkeypatch.setattr(ThreadProbe, "PROBE_ITERS", 2)
    cfg = tiny_config(tmp_path / "run", "train.num_threads=auto", "train.max_iters=6", "train.log_period=6")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # 2 cores on any machine
    with caplog.at_level("INFO", logger="maskrcnn"):
        train(cfg, progress=False)
    chosen = [line for line in caplog.messages if line.startswith("threads: median training step with 2 threads")]
    assert len(chosen) == 1 and chosen[0].split()[-1] in ("1", "2")
    assert torch.get_num_threads() == int(chosen[0].split()[-1])

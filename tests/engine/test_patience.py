"""Early stopping, `train.patience`: the run stops after that many evaluations in a row without a better validation
mask AP, its schedule annealed over a tail of a tenth of the iterations trained (`TimeBudget.end_at`, the time
budget's refit), best.pt the best evaluation's; off, the whole plan trains; the end never lengthens a plan.

The steps are fake (they only move the schedule, and note the lr each one used), the model a stand-in of two
weights (quick checkpoints) and the evaluations return hand-set mask APs by iteration: the schedule's arithmetic
is checked by hand in a fraction of a second per run."""

from __future__ import annotations

import math
import os
import signal
import time
from types import SimpleNamespace

import pytest
import torch

import maskrcnn.engine.train as train_module
from maskrcnn.config import ConfigError
from maskrcnn.engine.checkpoint import load_checkpoint
from maskrcnn.engine.schedule import Patience, TimeBudget
from maskrcnn.engine.train import Trainer, train
from maskrcnn.fileio import read_jsonl

# the fake steps move the schedule without an optimiser step
pytestmark = pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")

# mask AP of the evaluation at each iteration (every 10); 0.2 at any other (the later ones and the final one)
APS = {10: 0.1, 20: 0.3, 30: 0.2, 40: 0.2}
LR = 0.01
SETTINGS = ("train.max_iters=100", "train.eval_period=10", "train.log_period=10", "train.checkpoint_period=0",
            "train.warmup_iters=10", f"train.lr={LR}", "train.schedule=cosine")


def cosine(iteration: int, length: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * iteration / length))


@pytest.fixture
def fake_run(monkeypatch, tiny_config, tmp_path):
    """fake_run(*settings, aps=APS, signal_at=None, resume=False) -> (TrainResult, {iteration: lr it used}): `train`
    with fake steps of 1 s each (on a fake clock) and evaluations that score `aps[iteration]`; a SIGTERM arrives
    during step `signal_at`."""
    used_lrs: dict[int, float] = {}
    current = {"iteration": 0, "aps": APS, "signal_at": None}
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(time, "perf_counter", lambda: clock.now)

    def fake_step(self, iteration: int) -> dict[str, float]:
        used_lrs[iteration] = self.optimizer.param_groups[0]["lr"]
        clock.now += 1.0
        self.scheduler.step()
        current["iteration"] = iteration + 1
        if iteration == current["signal_at"]:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"loss_fake": 1.0}

    def fake_evaluation(*args, **kwargs) -> SimpleNamespace:
        return SimpleNamespace(metrics={"segm": {"AP": current["aps"].get(current["iteration"], 0.2)}})

    monkeypatch.setattr(Trainer, "step", fake_step)
    monkeypatch.setattr(train_module, "evaluate_dataset", fake_evaluation)

    def run(*settings: str, aps: dict[int, float] = APS, signal_at: int | None = None, resume: bool = False):
        current.update(aps=aps, signal_at=signal_at)
        cfg = tiny_config(tmp_path / "run", *SETTINGS, *settings)
        return train(cfg, model=torch.nn.Linear(1, 1), resume=resume, progress=False), used_lrs

    return run


def evaluated(out_dir) -> list[tuple[int, float]]:
    """(iteration, mask AP) of each evaluation record in the run's metrics.jsonl."""
    return [(r["iteration"], r["eval"]["segm"]["AP"]) for r in read_jsonl(out_dir / "metrics.jsonl") if "eval" in r]


@pytest.mark.parametrize("budget", [(), ("train.max_minutes=600", "train.log_period=1")])
def test_patience_stops_after_evaluations_without_a_better_ap_with_the_schedule_annealed(fake_run, tmp_path, budget):
    """APs 0.1, 0.3, 0.2, 0.2 at 10..40 and patience 2: the second evaluation without a better AP than 0.3 is at
    40; the tail is 40 / 10 = 4 iterations, so the cosine's length becomes 44. Step 40's lr was set by step 39,
    before that evaluation (cosine(40 / 100), 0.65 of the base, as a time budget's refit takes effect one step
    late too); steps 41..43 use cosine(n / 44): 0.011, 0.0051 and 0.0013 of the base, and the run stops at 44
    with lr 0. The final evaluation (0.2) keeps best.pt at iteration 20. Under a time budget with room for 36000
    iterations, refitted every iteration, it ends at 44 all the same."""
    result, used_lrs = fake_run("train.patience=2", *budget)
    assert result.iterations == 44 and not result.stopped_early and result.interrupted_by is None
    assert [used_lrs[n] for n in (39, 40)] == pytest.approx([LR * cosine(39, 100), LR * cosine(40, 100)])
    assert [used_lrs[n] for n in (41, 42, 43)] == pytest.approx([LR * cosine(n, 44) for n in (41, 42, 43)])
    assert used_lrs[41] < 0.012 * LR and used_lrs[43] < 0.0013 * LR and max(used_lrs) == 43
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    assert records[-1]["iteration"] == 44 and records[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert evaluated(tmp_path / "run") == [(10, 0.1), (20, 0.3), (30, 0.2), (40, 0.2), (44, 0.2)]
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["iteration"] == 20 and best["best_ap"] == 0.3
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 44
    lines = [line for line in (tmp_path / "run" / "log.txt").read_text().splitlines() if "early stopping" in line]
    assert len(lines) == 1 and lines[0].endswith(
        "early stopping (train.patience 2): 2 evaluations without a better mask AP than 0.3000 of iteration 20; "
        "the schedule anneals to its end at iteration 44, where the run stops")


@pytest.mark.parametrize("setting, iterations", [("train.patience=null", 100), ("train.patience=0", 100),
                                                 ("train.patience=3", 55), ("train.patience=5", 77)])
def test_patience_off_trains_the_whole_plan_and_a_longer_one_waits_longer(fake_run, tmp_path, setting, iterations):
    """The same APs, then 0.2 ever after: off, all 100 iterations train (and evaluate every 10); patience 3 runs out
    at 50 (tail 5), patience 5 at 70 (tail 7). best.pt is iteration 20's every time."""
    result, used_lrs = fake_run(setting)
    assert result.iterations == iterations and max(used_lrs) == iterations - 1
    assert [n for n, _ in evaluated(tmp_path / "run")] == [*range(10, iterations, 10), iterations]
    assert load_checkpoint(tmp_path / "run" / "best.pt")["iteration"] == 20


def test_a_better_ap_starts_the_count_again(fake_run, tmp_path):
    """0.1, 0.3, 0.2, 0.4, 0.2, 0.2 at 10..60 with patience 2: 0.4 at 40 resets the count; it runs out at 60, tail 6;
    best.pt is iteration 40's."""
    result, _ = fake_run("train.patience=2", aps={10: 0.1, 20: 0.3, 30: 0.2, 40: 0.4, 50: 0.2, 60: 0.2})
    assert result.iterations == 66
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["iteration"] == 40 and best["best_ap"] == 0.4


@pytest.mark.parametrize("signal_at", [34, 41])
def test_a_resumed_run_stops_where_the_uninterrupted_one_did(fake_run, tmp_path, signal_at):
    """Stopped by a signal after iteration 35 (one evaluation without a better AP since best.pt's 20, counted again
    from best.pt) or 42 (in the tail: the end, 44, is in last.pt's schedule), the resumed run ends at 44 as above."""
    stopped, _ = fake_run("train.patience=2", signal_at=signal_at)
    assert stopped.interrupted_by == "SIGTERM" and stopped.iterations == signal_at + 1
    assert ("end" in load_checkpoint(tmp_path / "run" / "last.pt")["budget"]) == (signal_at > 40)
    resumed, used_lrs = fake_run("train.patience=2", resume=True)
    assert resumed.iterations == 44 and used_lrs[43] == pytest.approx(LR * cosine(43, 44))
    assert load_checkpoint(tmp_path / "run" / "best.pt")["iteration"] == 20


def test_the_end_never_lengthens_a_plan_and_survives_a_resume(monkeypatch):
    """A plan of 42 (a time budget's) stays 42 when patience would end at 44; an end at 30 shortens it, a later
    end_at(35) does not undo that; a resume brings the end back, without a budget and with one, whose refit plans
    no further even with time for 1000 iterations more."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(time, "perf_counter", lambda: clock.now)
    budget = TimeBudget(max_iters=100, minutes=None)
    budget.planned_iters = 42
    budget.end_at(44)
    assert budget.planned_iters == 42
    budget.end_at(30)
    budget.end_at(35)
    assert budget.planned_iters == 30 and budget.state_dict()["end"] == 30
    for minutes in (None, 100.0):
        resumed = TimeBudget(max_iters=100, minutes=minutes)
        resumed.load_state_dict(budget.state_dict())
        resumed.start(20)
        resumed.steady_from(20)
        clock.now += 5.0  # 1 s an iteration: the hour and a half left fits 6000
        resumed.refit(25)
        assert resumed.planned_iters == 30
    assert "end" not in TimeBudget(max_iters=100, minutes=None).state_dict()  # as the checkpoints hold it today


def test_patience_ends_the_plan_only_when_it_runs_out():
    """Hand-fed APs: counting, the best's iteration, a resumed count (best at 20, resumed at 45, evaluations every
    10: 30 and 40 were without a better AP), off, and after the time budget ran out (the final evaluation of a run
    that it stopped)."""
    budget = TimeBudget(max_iters=1000, minutes=None)
    patience = Patience(3, eval_period=10, budget=budget)
    assert [patience.record(ap, n) for n, ap in ((10, 0.1), (20, 0.3), (30, 0.3), (40, 0.2))] == [
        True, True, False, False]
    assert budget.planned_iters == 1000 and (patience.best_ap, patience.best_iter, patience.waited) == (0.3, 20, 2)
    assert not patience.record(0.25, 50) and budget.planned_iters == 55 and budget.end == 55
    resumed = Patience(3, eval_period=10, budget=TimeBudget(max_iters=1000, minutes=None),
                       best={"best_ap": 0.3, "iteration": 20}, iteration=45)
    assert resumed.waited == 2 and not resumed.record(0.3, 50) and resumed.budget.planned_iters == 55
    off = Patience(0, eval_period=10, budget=TimeBudget(max_iters=1000, minutes=None))
    assert off.record(0.1, 10) and not any(off.record(0.1, n) for n in range(20, 200, 10))
    assert off.waited == 18 and off.budget.planned_iters == 1000 and off.budget.end is None
    spent = Patience(1, eval_period=10, budget=TimeBudget(max_iters=1000, minutes=0.0))
    assert spent.record(0.1, 10) and not spent.record(0.1, 20) and spent.budget.planned_iters == 1000


@pytest.mark.parametrize("setting, message", [
    ("train.patience=-1", r"^train.patience: must be at least 0, got -1$"),
    ("train.patience=2.5", r"^train.patience: expected an integer, got 2.5$"),
    ("train.patience=true", r"^train.patience: expected an integer, got True$"),
])
def test_a_bad_patience_is_one_line_naming_the_key(tiny_config, tmp_path, setting, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path / "run", setting)


def test_patience_without_evaluations_on_the_way_is_refused(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match=r"^train.patience: 2 counts evaluations on the way, but train.eval_period"):
        tiny_config(tmp_path / "run", "train.patience=2", "train.eval_period=0")
    assert tiny_config(tmp_path / "run", "train.patience=0").train.patience == 0  # off needs none

"""Training loop: exact resume, atomic checkpoints, the non-finite loss error, schedule, time budget, outputs."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
import yaml

import maskrcnn.engine.train as train_module
from maskrcnn.config import config_from_dict
from maskrcnn.data import DatasetError
from maskrcnn.engine.checkpoint import LOCK_NAME, CheckpointError, load_checkpoint, save_checkpoint
from maskrcnn.config import ConfigError
from maskrcnn.engine.distributed import sync_batchnorm
from maskrcnn.engine.schedule import TimeBudget, lr_factor
from maskrcnn.engine.stop_signals import StopSignals
from maskrcnn.engine.train import NonFiniteLossError, Trainer, TrainResult, train
from maskrcnn.cli import main
from maskrcnn.fileio import DiskFullError, read_jsonl
from maskrcnn.model import build_model


def test_lr_factor_warmup_step_and_cosine():
    common = dict(max_iters=100, warmup_iters=10, warmup_factor=0.1, steps=(50, 80), gamma=0.1)
    # Warm-up: 0.1 at iteration 0, halfway (iteration 5) 0.1 * 0.5 + 0.5 = 0.55, then 1.
    assert lr_factor(0, schedule="step", **common) == pytest.approx(0.1)
    assert lr_factor(5, schedule="step", **common) == pytest.approx(0.55)
    assert lr_factor(10, schedule="step", **common) == pytest.approx(1.0)
    assert lr_factor(50, schedule="step", **common) == pytest.approx(0.1)
    assert lr_factor(99, schedule="step", **common) == pytest.approx(0.01)
    # Cosine: 0.5 * (1 + cos(pi * 50 / 100)) = 0.5 at the middle, 0 at the end.
    assert lr_factor(50, schedule="cosine", **common) == pytest.approx(0.5)
    assert lr_factor(100, schedule="cosine", **common) == pytest.approx(0.0)
    assert lr_factor(5, schedule="cosine", **common) == pytest.approx(0.55 * 0.5 * (1 + math.cos(math.pi * 0.05)))


def test_train_writes_checkpoints_metrics_and_evaluates(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path / "run", "train.eval_period=2", "train.clip_grad_norm=5.0")
    result = train(cfg, progress=False)
    run = tmp_path / "run"
    assert result.iterations == 4 and not result.stopped_early
    state = load_checkpoint(run / "last.pt")
    assert {"model", "optimizer", "scheduler", "iteration", "config", "categories"} <= set(state)
    assert state["iteration"] == 4
    assert state["categories"] == [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]  # tiny: 2 shapes
    assert state["config"]["train"]["out_dir"] == str(run)
    assert load_checkpoint(run / "best.pt")["iteration"] in (2, 4)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in train_records] == [1, 2, 3, 4]
    assert {"loss_rpn_cls", "loss_rpn_box", "loss_box_cls", "loss_box_reg", "loss_mask", "lr"} <= set(train_records[0])
    assert [r["iteration"] for r in records if "eval" in r] == [2, 4]
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"bbox", "segm", "voc"} <= set(metrics)
    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in run.glob(".*")) == []  # no lock file or temporary left behind
    # our own checkpoint is a valid `model.weights` (loaded with weights_only=True there)
    reloaded = build_model(replace(cfg.model, weights=str(run / "last.pt"))).state_dict()
    assert all(torch.equal(reloaded[name], value) for name, value in state["model"].items())


def training_records(run) -> list[int]:
    return [r["iteration"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_the_same_weights(tmp_path, monkeypatch, tiny_config, num_workers):
    settings = ("data.flip_prob=0.5", f"data.num_workers={num_workers}")
    reference = train(tiny_config(tmp_path / "a", *settings), progress=False)

    real_loader = train_module.build_train_loader

    def crashing_loader(*args, **kwargs):
        batches = real_loader(*args, **kwargs)
        for count, batch in enumerate(batches):
            if count == 3:  # the 4th batch: a crash after the checkpoint of iteration 2 and one more step
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(train_module, "build_train_loader", crashing_loader)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "b", *settings), progress=False)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["iteration"] == 2
    monkeypatch.setattr(train_module, "build_train_loader", real_loader)
    resumed = train(tiny_config(tmp_path / "b", *settings), resume=True, progress=False)

    assert resumed.iterations == 4
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3, 4]  # iteration 3 of the crashed run dropped
    expected, got = reference.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_resume_without_checkpoint_names_the_file(tmp_path, tiny_config):
    with pytest.raises(CheckpointError, match="last.pt"):
        train(tiny_config(tmp_path / "none"), resume=True, progress=False)


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "iteration": 1}, path)
    real_save = torch.save

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "iteration": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    state = load_checkpoint(path)
    assert state["iteration"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_load_checkpoint_rejects_foreign_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no 'model' state dict"):
        load_checkpoint(tmp_path / "other.pt")


def test_non_finite_loss_names_iteration_and_term(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path / "nan", "train.checkpoint_period=1")

    class NanAtThirdStep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = build_model(cfg.model)
            self.calls = 0

        def forward(self, images, targets=None):
            losses = self.inner(images, targets)
            if self.training:
                self.calls += 1
                if self.calls == 3:
                    losses["loss_box_reg"] = losses["loss_box_reg"] * float("nan")
            return losses

    with pytest.raises(NonFiniteLossError, match=r"iteration 2: loss term loss_box_reg is nan"):
        train(cfg, model=NanAtThirdStep(), progress=False)
    state = load_checkpoint(tmp_path / "nan" / "last.pt")
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_spent_time_budget_ends_the_schedule_at_once_and_evaluates(tmp_path, tiny_config):
    result = train(tiny_config(tmp_path / "t", "train.max_minutes=0.0", "train.max_iters=50"), progress=False)
    assert result.iterations == 1 and not result.stopped_early  # no time left: the plan ends at the first log
    assert result.evaluation is not None and (tmp_path / "t" / "metrics.json").is_file()
    assert load_checkpoint(tmp_path / "t" / "last.pt")["iteration"] == 1


class FakeClock:
    """time.perf_counter at hand-chosen instants."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_budget_fits_the_schedule_to_the_measured_speed(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(train_module.time, "perf_counter", clock)
    budget = TimeBudget(max_iters=1000, minutes=1.0)
    budget.start(0)
    clock.now = 5.0
    budget.refit(10)  # start-up, the only speed yet: 0.5 s/it, 55 s left: 110 more iterations
    assert budget.planned_iters == 120 and budget.seconds_per_iteration() == 0.5
    budget.steady_from(10)  # start-up over: the speed is measured from here on
    clock.now = 10.0
    budget.refit(20)  # 0.5 s/it, 50 s left: 100 more iterations
    assert budget.planned_iters == 120
    clock.now = 20.0
    budget.refit(30)  # 15 s for 20 iterations: 0.75 s/it, 40 s left: 53 more
    assert budget.planned_iters == 83
    state = budget.state_dict()
    assert state == {"spent": 20.0, "planned_iters": 83}

    resumed = TimeBudget(max_iters=1000, minutes=1.0)  # another process, its own clock
    resumed.load_state_dict(state)
    clock.now = 100.0
    resumed.start(30)
    assert resumed.planned_iters == 83 and resumed.elapsed() == 20.0
    clock.now = 110.0
    resumed.refit(35)  # 2 s/it over the start-up would plan 35 + 15: the checkpoint's plan stays
    assert resumed.planned_iters == 83
    clock.now = 139.0
    assert not resumed.out_of_time()
    clock.now = 140.0  # 20 s before + 40 s now: the minute is spent
    assert resumed.out_of_time()
    shorter = TimeBudget(max_iters=60, minutes=1.0)  # resumed with a smaller max_iters
    shorter.load_state_dict(state)
    assert shorter.planned_iters == 60
    no_budget = TimeBudget(max_iters=500, minutes=None)  # resumed without a budget: max_iters
    no_budget.load_state_dict(state)
    assert no_budget.planned_iters == 500 and no_budget.spent == 20.0
    unlimited = TimeBudget(max_iters=50, minutes=None)
    unlimited.start(0)
    clock.now = 1000.0
    unlimited.refit(10)
    assert unlimited.planned_iters == 50 and not unlimited.out_of_time()


# the fake steps below move the schedule without an optimiser step
SCHEDULER_ONLY = pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")


def run_on_the_fake_clock(trainer: Trainer, clock: FakeClock, seconds: dict[int, float], *,
                          stop_at: int | None = None) -> tuple[TrainResult, dict[int, float]]:
    """Runs `trainer` with steps that only advance `clock` (by `seconds[iteration]`, 1 s where absent) and the
    schedule; a signal arrives during iteration `stop_at`. Returns the result and the lr of each log record."""
    stop = StopSignals()

    def step(iteration: int) -> dict[str, float]:
        clock.now += seconds.get(iteration, 1.0)
        trainer.scheduler.step()
        if iteration == stop_at:
            stop.received = "SIGINT"
        return {"loss_fake": 1.0}

    trainer.step, trainer.evaluate = step, lambda iteration: None
    result = trainer.run(stop)
    return result, {r["iteration"]: r["lr"] for r in map(json.loads, (trainer.out_dir / "metrics.jsonl").open())
                    if "lr" in r}


def cosine(iteration: int, length: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * iteration / length))


@SCHEDULER_ONLY
def test_a_budget_shorter_than_the_warm_up_ends_at_lr_zero(tmp_path, tiny_config, monkeypatch):
    """`maskrcnn demo --minutes 1` on a slow machine: 60 iterations of 1 s fit, fewer than the 100 of warm-up.
    The plan shrinks during warm-up, the warm-up to half of it, and the lr reaches 0 as the minute ends (it
    stopped at iteration 60 with 60 % of the lr, still warming up)."""
    clock = FakeClock()
    monkeypatch.setattr(train_module.time, "perf_counter", clock)
    cfg = tiny_config(tmp_path / "run", "train.max_minutes=1", "train.max_iters=3000", "train.warmup_iters=100",
                      "train.warmup_factor=0.001", "train.log_period=10", "train.checkpoint_period=0")
    trainer = Trainer(cfg, device=torch.device("cpu"), model=None, train_set=None, val_set=None, resume=False)
    result, lrs = run_on_the_fake_clock(trainer, clock, {})
    assert result.iterations == 60 and not result.stopped_early and clock.now == 60.0
    # iteration 10: the plan is still 3000 (it is refitted after this record); from then on 60, warm-up 30 of them
    expected = {10: (0.001 + 0.999 * 10 / 100) * cosine(10, 3000), 20: (0.001 + 0.999 * 20 / 30) * cosine(20, 60),
                **{n: cosine(n, 60) for n in (30, 40, 50, 60)}}
    assert lrs == pytest.approx({n: 0.01 * factor for n, factor in expected.items()}, abs=1e-9)
    assert lrs[60] == pytest.approx(0.0, abs=1e-12)


@SCHEDULER_ONLY
def test_a_machine_that_slows_down_after_the_plan_is_stopped_by_the_budget(tmp_path, tiny_config, monkeypatch):
    """1 s per iteration plans 60 iterations into the minute; from iteration 40 on they take 4 s: the minute ends
    after iteration 45, before the plan, which the result says."""
    clock = FakeClock()
    monkeypatch.setattr(train_module.time, "perf_counter", clock)
    cfg = tiny_config(tmp_path / "run", "train.max_minutes=1", "train.max_iters=3000", "train.warmup_iters=10",
                      "train.log_period=10", "train.checkpoint_period=0")
    trainer = Trainer(cfg, device=torch.device("cpu"), model=None, train_set=None, val_set=None, resume=False)
    result, _ = run_on_the_fake_clock(trainer, clock, {iteration: 4.0 for iteration in range(40, 100)})
    assert trainer.budget.planned_iters == 60 and result.iterations == 45 and result.stopped_early
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 45


@SCHEDULER_ONLY
def test_a_schedule_that_has_annealed_is_not_extended(tmp_path, tiny_config, monkeypatch):
    """1 s per iteration plans 60 iterations into the minute; from iteration 50 on they take 0.2 s, so at iteration
    60 (lr 0, the end of the plan) 8 s are left at about 0.87 s per iteration over the window: a refit there would
    plan 9 more iterations at lr ~0 (as it did, one at a time, on a busy machine). The run ends annealed at 60,
    early, with the lr of its last record 0."""
    clock = FakeClock()
    monkeypatch.setattr(train_module.time, "perf_counter", clock)
    cfg = tiny_config(tmp_path / "run", "train.max_minutes=1", "train.max_iters=3000", "train.warmup_iters=10",
                      "train.log_period=10", "train.checkpoint_period=0")
    trainer = Trainer(cfg, device=torch.device("cpu"), model=None, train_set=None, val_set=None, resume=False)
    result, lrs = run_on_the_fake_clock(trainer, clock, {iteration: 0.2 for iteration in range(50, 100)})
    assert trainer.budget.planned_iters == 60 and result.iterations == 60 and not result.stopped_early
    assert clock.now == pytest.approx(52.0) and max(lrs) == 60 and lrs[60] == pytest.approx(0.0, abs=1e-12)


@SCHEDULER_ONLY
def test_resume_under_a_budget_continues_the_schedule(tmp_path, tiny_config, monkeypatch):
    """A run stopped at iteration 30 of a 2-minute budget (1 s per iteration: a plan of 120) is resumed; its first
    5 iterations take 3 s each (start-up). The plan is re-measured from the steady iterations only: 70 s are left at
    1 s each at iteration 40, so the schedule ends at 110, as the budget does (a first refit over the start-up
    planned 75 and the lr fell from 0.75 to 0.25 of the base between two records)."""
    clock = FakeClock()
    monkeypatch.setattr(train_module.time, "perf_counter", clock)
    cfg = tiny_config(tmp_path / "run", "train.max_minutes=2", "train.max_iters=3000", "train.warmup_iters=10",
                      "train.log_period=10", "train.checkpoint_period=0")
    first = Trainer(cfg, device=torch.device("cpu"), model=None, train_set=None, val_set=None, resume=False)
    result, lrs = run_on_the_fake_clock(first, clock, {}, stop_at=29)
    assert result.iterations == 30 and load_checkpoint(tmp_path / "run" / "last.pt")["budget"] == {
        "spent": 30.0, "planned_iters": 120}
    assert lrs[30] == pytest.approx(0.01 * cosine(30, 120))

    clock.now = 1000.0  # another process
    resumed = Trainer(cfg, device=torch.device("cpu"), model=None, train_set=None, val_set=None, resume=True)
    assert resumed.threads.steady_iter == 35  # one thread count: 5 untimed start-up iterations, no probe
    result, lrs = run_on_the_fake_clock(resumed, clock, {iteration: 3.0 for iteration in range(30, 35)})
    expected = {40: cosine(40, 120), **{n: cosine(n, 110) for n in range(50, 111, 10)}}
    assert {n: lr for n, lr in lrs.items() if n > 30} == pytest.approx({n: 0.01 * factor for n, factor in
                                                                       expected.items()}, abs=1e-9)
    assert result.iterations == 110 and not result.stopped_early and clock.now - 1000.0 + 30.0 == 120.0


def test_schedule_follows_the_planned_length_and_resume_restores_it(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path / "run", "train.max_minutes=30", "train.schedule=step", "train.steps=[2]")
    train(cfg, progress=False)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["budget"]["planned_iters"] == 4 and state["budget"]["spent"] > 0  # 30 min: max_iters fit
    state["budget"] = {"spent": 120.0, "planned_iters": 3}
    save_checkpoint(state, tmp_path / "run" / "last.pt")
    trainer = Trainer(cfg, device=torch.device("cpu"), model=None, train_set=None, val_set=None, resume=True)
    assert trainer.budget.planned_iters == 3 and trainer.budget.elapsed() >= 120.0
    trainer.budget.planned_iters = 40  # ten times max_iters: the step at 2 moves to 20, warm-up (2) stays
    assert [trainer.lr_factor(i) for i in (19, 20)] == [pytest.approx(1.0), pytest.approx(0.1)]
    cosine = Trainer(replace(cfg, train=replace(cfg.train, schedule="cosine", out_dir=str(tmp_path / "c"))),
                     device=torch.device("cpu"), model=None, train_set=None, val_set=None, resume=False)
    cosine.budget.planned_iters = 10
    assert cosine.lr_factor(5) == pytest.approx(0.5)  # half way through the planned cosine


def test_progress_lines_go_to_the_log_and_log_txt(tmp_path, tiny_config, caplog):
    with caplog.at_level("INFO", logger="maskrcnn"):
        train(tiny_config(tmp_path / "run", "train.log_period=2"), progress=False)
    lines = caplog.messages
    assert any("1 process x 2 images = total batch 2; train.lr 0.01 is for this total batch (linear scaling rule"
               in line for line in lines)
    progress = [line for line in lines if line.startswith("iter ")]
    assert [line.split()[1] for line in progress] == ["2/4", "4/4"]
    assert all(" loss " in line and "(box_cls " in line and " rpn_cls " in line and " lr " in line for line in progress)
    assert "images/s  ETA " in progress[-1]
    assert any(line.startswith("evaluate: 2 images in") for line in lines)
    log_txt = (tmp_path / "run" / "log.txt").read_text()
    assert "iter 4/4" in log_txt and "evaluate: 2 images in" in log_txt
    assert not (tmp_path / "run" / "tb").exists()  # TensorBoard only when asked


def test_tensorboard_when_asked(tmp_path, tiny_config):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    train(tiny_config(tmp_path / "run", "train.tensorboard=true"), progress=False)
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


def test_tensorboard_asked_without_the_package_is_a_config_error(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were missing
    with pytest.raises(ConfigError, match=r"train.tensorboard: true needs the tensorboard package: pip install"):
        train(tiny_config(tmp_path / "other", "train.tensorboard=true"), progress=False)


def test_sync_batchnorm_only_where_it_can_work():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert sync_batchnorm(model, enabled=True, world_size=1, device=torch.device("cpu")) is model
    assert sync_batchnorm(model, enabled=False, world_size=2, device=torch.device("cuda")) is model
    converted = sync_batchnorm(model, enabled=True, world_size=2, device=torch.device("cuda"))
    assert isinstance(converted[1], torch.nn.SyncBatchNorm)
    with pytest.raises(ConfigError, match="train.sync_batchnorm: true needs CUDA"):
        sync_batchnorm(model, enabled=True, world_size=2, device=torch.device("cpu"))


def test_last_checkpoint_is_written_before_the_final_evaluation(tmp_path, monkeypatch, tiny_config):
    """A validation set that breaks the final evaluation loses no training (it lost iteration 3 before)."""
    def broken_evaluation(*args, **kwargs):
        raise DatasetError("val/7.png: cannot decode image (image id 7)")

    monkeypatch.setattr(train_module, "evaluate_dataset", broken_evaluation)
    with pytest.raises(DatasetError, match="7.png"):
        train(tiny_config(tmp_path / "run", "train.max_iters=3"), progress=False)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 3


class UnreadableValidationSet:
    class_names = ("a", "b")

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index):
        raise DatasetError(f"val/{index}.png: cannot decode image (image id {index})")


@pytest.mark.parametrize("val_set, message", [([], "the validation split has no images"),
                                               (UnreadableValidationSet(), "val/0.png: cannot decode")])
def test_validation_set_is_checked_before_training(tmp_path, tiny_config, val_set, message):
    with pytest.raises(DatasetError, match=message):
        train(tiny_config(tmp_path / "run"), val_set=val_set, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # failed before the first iteration


def test_full_disk_names_the_folder_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, tiny_config):
    """ENOSPC from the second checkpoint write (tests/test_fileio.py also fills a real tmpfs)."""
    real_save = torch.save
    calls = []

    def save_until_full(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    run = tmp_path / "run"
    with pytest.raises(DiskFullError, match=f"^no space left on {run} while writing last.pt; the previous version"):
        train(tiny_config(run), progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(run / "last.pt")["iteration"] == 2
    assert not list(run.glob(".*.tmp"))


def test_full_disk_while_logging_is_one_error_naming_the_folder(tmp_path, monkeypatch, tiny_config):
    def log_to_full_disk(self, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_module.MetricsLogger, "log", log_to_full_disk)
    run = tmp_path / "run"
    with pytest.raises(DiskFullError, match=f"^no space left on {run}; the files written before are kept"):
        train(tiny_config(run), progress=False)


KILLED_WHILE_SAVING = """
import os, signal, sys

import torch
import yaml

from maskrcnn.config import config_from_dict
from maskrcnn.engine.train import train

real_save = torch.save
saves = []


def save_then_die(obj, handle, *args, **kwargs):
    saves.append(1)
    if len(saves) == 2:  # half of the second checkpoint is on disk when the process is killed
        handle.write(b"PK\x03\x04" + bytes(4096))
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, handle, *args, **kwargs)


torch.save = save_then_die
train(config_from_dict(yaml.safe_load(open(sys.argv[1])), []), progress=False)
"""


def test_sigkill_while_writing_a_checkpoint_then_resume(tmp_path, tiny_values):
    """SIGKILL mid-write leaves a temporary file, a stale lock and (here added by hand) a torn metrics line; the
    resumed run cleans them up and continues from the previous checkpoint."""
    run = tmp_path / "run"
    values = {**tiny_values, "train": {**tiny_values["train"], "out_dir": str(run), "checkpoint_period": 1,
                                       "max_iters": 3}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(values))
    (tmp_path / "killed.py").write_text(KILLED_WHILE_SAVING)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    completed = subprocess.run([sys.executable, str(tmp_path / "killed.py"), str(tmp_path / "config.yaml")],
                               capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == -9, completed.stderr[-2000:]
    assert len(list(run.glob(".last.pt.*.tmp"))) == 1 and (run / LOCK_NAME).is_file()
    assert load_checkpoint(run / "last.pt")["iteration"] == 1
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"iteration": 3, "lr": 0.0')  # an append cut short

    result = train(config_from_dict(values, []), resume=True, progress=False)
    assert result.iterations == 3
    assert training_records(run) == [1, 2, 3]
    assert sorted(p.name for p in run.glob(".*")) == []



def logged_iterations(run) -> list[int]:
    path = run / "metrics.jsonl"
    return [record["iteration"] for record in read_jsonl(path) if "loss" in record] if path.is_file() else []


def test_sigterm_saves_last_pt_after_the_iteration_and_exits_143(tmp_path, tiny_values):
    """A real `maskrcnn train` process, as a job scheduler stops it."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_values))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "maskrcnn", "train", str(tmp_path / "tiny.yaml"), "--out",
                                str(run), "--set", "train.checkpoint_period=0", "--set", "train.max_iters=100000"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while len(logged_iterations(run)) < 2:
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-2000:]
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=240)
    finally:
        process.kill()
    done = logged_iterations(run)
    assert process.returncode == 128 + signal.SIGTERM == 143, stderr[-2000:]
    assert f"stopped by SIGTERM after iteration {done[-1]}" in stderr and "Traceback" not in stderr
    assert load_checkpoint(run / "last.pt")["iteration"] == done[-1]


def train_command(tmp_path, tiny_values, *settings: str) -> list[str]:
    """`maskrcnn train` of the tiny config into tmp_path/run, as arguments of `main`."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_values))
    return ["train", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "run"),
            *(part for setting in settings for part in ("--set", setting))]


def test_a_second_sigterm_stops_at_once_with_143_not_as_an_interrupt(tmp_path, tiny_values, monkeypatch, capsys):
    """Two SIGTERMs during one iteration (sent by this process to itself, the handler is the real one): the second
    exits with 143 at once (it was a KeyboardInterrupt: 'maskrcnn: interrupted', 130)."""
    real_step = Trainer.step

    def step_signalled_twice(self, iteration):
        values = real_step(self, iteration)
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return values

    monkeypatch.setattr(Trainer, "step", step_signalled_twice)
    with pytest.raises(SystemExit) as stopped:
        main(train_command(tmp_path, tiny_values, "train.max_iters=10", "train.checkpoint_period=2"))
    assert stopped.value.code == 143
    err = capsys.readouterr().err
    assert ("maskrcnn: SIGTERM: saving last.pt after this iteration" in err
            and "maskrcnn: SIGTERM: stopping at once; last.pt is the last checkpoint saved" in err), err
    assert "interrupted" not in err
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 2  # iteration 3 was cut short


def test_a_signal_during_the_final_evaluation_says_how_to_evaluate(tmp_path, tiny_values, monkeypatch, capsys):
    """Training is saved when the final evaluation starts: a signal stops the evaluation at once (it was finished,
    then no report was made and the line said to resume) with the command that makes the evaluation and report,
    which works."""
    real_evaluate = train_module.evaluate_dataset

    def signalled_evaluation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_dataset", signalled_evaluation)
    with pytest.raises(SystemExit) as stopped:
        main(train_command(tmp_path, tiny_values, "train.max_iters=2"))
    assert stopped.value.code == 143
    last = tmp_path / "run" / "last.pt"
    command = f"maskrcnn evaluate {last}"
    err = capsys.readouterr().err
    assert (f"maskrcnn: SIGTERM: stopping the final evaluation; {last} holds the 2 iterations trained: evaluate it "
            f"and make its report with: {command}") in err, err
    assert load_checkpoint(last)["iteration"] == 2
    monkeypatch.setattr(train_module, "evaluate_dataset", real_evaluate)
    assert main(command.split()[1:]) == 0
    assert (tmp_path / "run" / "eval_last" / "report.md").is_file()

"""Training loop: exact resume, atomic checkpoints, the non-finite loss error, schedule, time budget, outputs."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import yaml

import maskrcnn.engine.train as train_module
from maskrcnn.config import config_from_dict
from maskrcnn.data import DatasetError
from maskrcnn.engine.checkpoint import LOCK_NAME, CheckpointError, load_checkpoint, save_checkpoint
from maskrcnn.engine.train import NonFiniteLossError, lr_factor, train
from maskrcnn.fileio import DiskFullError
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


def test_time_budget_stops_early_and_evaluates(tmp_path, tiny_config):
    result = train(tiny_config(tmp_path / "t", "train.max_minutes=0.0", "train.max_iters=50"), progress=False)
    assert result.stopped_early and result.iterations == 1
    assert result.evaluation is not None and (tmp_path / "t" / "metrics.json").is_file()
    assert load_checkpoint(tmp_path / "t" / "last.pt")["iteration"] == 1


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

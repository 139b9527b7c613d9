"""Checkpoints load without running code and refuse NaN weights; the run folder's lock refuses a second writer."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from maskrcnn.engine.checkpoint import (
    LOCK_NAME,
    CheckpointError,
    RunLock,
    RunLockedError,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from maskrcnn.model.pretrained import first_non_finite


def test_a_crafted_pickle_is_refused_without_running(tmp_path, write_malicious_checkpoint):
    marker = tmp_path / "payload-ran"
    write_malicious_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "evil.pt")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'evil.pt'}: refused") and "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused_at_load_naming_file_and_tensor(tmp_path, bad):
    torch.save({"model": {"a.weight": torch.ones(3), "b.bias": torch.tensor([0.0, bad]),
                          "c.weight": torch.tensor([bad])}}, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"nan\.pt: weight b\.bias holds NaN or infinite values"):
        load_checkpoint(tmp_path / "nan.pt")


def test_non_finite_weights_are_never_written(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "iteration": 1}, path)
    with pytest.raises(CheckpointError, match=r"last\.pt: not written, weight w is NaN or infinite"):
        save_checkpoint({"model": {"w": torch.tensor([1.0, math.nan])}, "iteration": 2}, path)
    assert load_checkpoint(path)["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_first_non_finite_ignores_integer_tensors():
    state = {"num_batches_tracked": torch.tensor(3), "w": torch.zeros(2), "v": torch.tensor([math.inf])}
    assert first_non_finite(state) == "v"
    assert first_non_finite({"w": torch.zeros(2)}) is None


def test_second_writer_is_refused_with_the_owners_pid(tmp_path):
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunLockedError) as info:
            with RunLock(tmp_path):
                pass
        assert str(info.value).startswith(f"{tmp_path}: another training (pid {os.getpid()}) is writing")
    assert not (tmp_path / LOCK_NAME).exists()  # released
    with RunLock(tmp_path):  # and free again
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(dead.stdout)  # what a killed trainer leaves behind
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_load_model_gives_the_checkpoints_weights_in_eval_mode(tiny_run):
    state = load_checkpoint(tiny_run / "last.pt")
    loaded = load_model(tiny_run / "last.pt", overrides=["model.box_head.score_thresh=0.3"])
    assert not loaded.model.training and loaded.device == torch.device("cpu")
    assert all(torch.equal(value, state["model"][key]) for key, value in loaded.model.state_dict().items())
    assert loaded.config.model.box_head.score_thresh == 0.3
    assert [c["name"] for c in loaded.categories] == [c["name"] for c in state["categories"]]


def test_load_model_refuses_a_config_its_weights_do_not_fit(tiny_run):
    with pytest.raises(CheckpointError, match=f"{tiny_run / 'last.pt'}: weights do not fit"):
        load_model(tiny_run / "last.pt", overrides=["model.mask_head.conv_channels=16"])


@pytest.mark.parametrize("categories, message", [
    ([], "its categories (0) do not give the 2 classes"),
    ([{"id": 1, "name": "circle"}], "its categories (1) do not give the 2 classes"),
    ([{"id": 1}, {"id": 2}], "category 0 is {'id': 1}, not an integer id with a name"),
    ([{"id": 1, "name": "circle"}, {"id": 2, "name": "  "}], "category 1 is"),
    ([{"id": "1", "name": "circle"}, {"id": 2, "name": "square"}], "category 0 is"),
    ([{"id": 1, "name": "circle"}, {"id": 1, "name": "square"}], "its categories repeat an id"),
    ("person", "its categories (str) do not give"),
])
def test_checkpoint_categories_are_checked_when_it_is_loaded(tiny_run, tmp_path, categories, message):
    """Every field a checkpoint gives is checked at load: categories without names, of the wrong type, fewer or
    more than the model's classes are one CheckpointError naming the file (not a KeyError where they are used)."""
    state = load_checkpoint(tiny_run / "last.pt")
    assert state["config"]["model"]["num_classes"] == 2 and len(state["categories"]) == 2
    path = tmp_path / "edited.pt"
    torch.save({**state, "model": dict(state["model"]), "categories": categories}, path)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_a_checkpoint_whose_config_is_not_a_dict_is_refused(tiny_run, tmp_path):
    state = load_checkpoint(tiny_run / "last.pt")
    path = tmp_path / "edited.pt"
    torch.save({**state, "model": dict(state["model"]), "config": "tiny"}, path)
    with pytest.raises(CheckpointError, match=f"{path}: its config is a str, not a dict of settings"):
        load_model(path)

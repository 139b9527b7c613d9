"""Checkpoints, the run folder's lock, and a checkpoint turned back into a model.

A checkpoint is a dict of tensors and plain values (numbers, strings, lists, dicts) only, so that every file is
read with `torch.load(weights_only=True)`: a crafted file cannot run code when it is loaded, and our own
checkpoints also load wherever a plain state dict is expected (`model.weights: runs/x/last.pt`).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from maskrcnn.config import Config, ConfigError, config_from_dict, config_to_dict, load_config, read_config_file
from maskrcnn.data import describe_categories
from maskrcnn.engine.common import resolve_device
from maskrcnn.errors import UserError
from maskrcnn.fileio import atomic_write
from maskrcnn.model import build_model, from_torchvision
from maskrcnn.model.pretrained import WeightsError, first_non_finite, load_state_dict_checked

LOCK_NAME = ".lock"  # in the run folder: the pid of the process training there


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be read (missing, damaged, unsafe, not ours, non-finite weights) or must not be written
    (non-finite weights); the message names the file."""


class RunLockedError(UserError, RuntimeError):
    """Another live process is training in the same run folder; the message names it and the lock file."""


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Writes `state` (with a "model" state dict) so that `path` is always either the old file or the complete
    new one (`fileio.atomic_write`).

    Raises:
        CheckpointError: a weight of state["model"] is NaN or infinite; nothing is written, `path` is kept.
        DiskFullError: no space left; `path` is kept.
    """
    path = Path(path)
    bad = first_non_finite(state["model"])
    if bad is not None:
        raise CheckpointError(f"{path}: not written, weight {bad} is NaN or infinite; the previous checkpoint "
                              f"is kept")
    with atomic_write(path) as handle:
        torch.save(state, handle)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def load_checkpoint(path: str | Path) -> dict:
    """Loads a checkpoint written by `save_checkpoint` (on the CPU), with `torch.load(weights_only=True)`.

    Raises:
        CheckpointError: the file does not exist, is damaged, holds Python objects other than tensors and plain
            containers (refused unread: unpickling them could run code), is not a dict with a "model" state dict,
            or has a NaN / infinite weight (it would predict nothing).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # mmap: the tensors are read when used (best.pt is opened for its "best_ap" only)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused, it holds Python objects other than tensors and plain values, "
                              f"which could run code when loaded ({_first_line(error)})") from None
    except Exception as error:  # torch raises several types for a damaged or foreign file
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(error)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path}: not a maskrcnn checkpoint (no 'model' state dict)")
    bad = first_non_finite(state["model"])
    if bad is not None:
        raise CheckpointError(f"{path}: weight {bad} holds NaN or infinite values; a model with it predicts "
                              f"nothing (was it saved after a diverged step?)")
    return state


def load_resume_checkpoint(path: str | Path, *, optimizer: str) -> dict:
    """last.pt to resume a training with `optimizer` (train.optimizer) from.

    Raises:
        CheckpointError: unreadable, not written by training (no optimizer, scheduler or iteration), or trained with
            another optimizer (its state would load silently, then fail mid-step).
    """
    state = load_checkpoint(path)
    missing = [key for key in ("optimizer", "scheduler", "iteration") if key not in state]
    if missing:
        raise CheckpointError(f"{path}: cannot resume from it, it has no {missing[0]} (not a last.pt written by "
                              f"training)")
    saved_optimizer = state.get("config", {}).get("train", {}).get("optimizer", optimizer)
    if saved_optimizer != optimizer:
        raise CheckpointError(f"{path}: trained with train.optimizer={saved_optimizer}, the config says {optimizer}; "
                              f"resume with the same optimizer")
    return state


@dataclass
class LoadedModel:
    """A checkpoint's model, ready for inference, with what evaluating or running it needs."""

    config: Config  # the checkpoint's config, with the data section and overrides asked for
    model: torch.nn.Module  # in eval mode on `device`, with the checkpoint's weights
    device: torch.device  # from config.eval.device
    categories: list[dict]  # [{"id", "name"}] of labels 1..K: the training data's category ids and names


def load_model(path: str | Path, *, data_config: str | Path | None = None, overrides: list[str] = ()) -> LoadedModel:
    """The model of a checkpoint written by training, for evaluation, prediction or export.

    Args:
        path: a checkpoint with "config" and "model" (last.pt, best.pt).
        data_config: a YAML file or preset whose data section replaces the checkpoint's (what to evaluate on).
        overrides: `key.path=value` changes of the checkpoint's config (e.g. model.box_head.score_thresh=0.3).
    Raises:
        CheckpointError: unreadable or unsafe file, no config, or weights that do not fit its config's model.
        ConfigError: `data_config` has no data section, or a bad override.
    """
    state = load_checkpoint(path)
    if "config" not in state:
        raise CheckpointError(f"{path}: checkpoint has no config; it was not written by `maskrcnn train`")
    values = state["config"]
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: its config is a {type(values).__name__}, not a dict of settings")
    if data_config is not None:
        if "data" not in read_config_file(data_config):
            raise ConfigError(f"--data-config {data_config}: the file has no 'data' section to evaluate on")
        values = dict(values, data=config_to_dict(load_config(data_config).data))
    cfg = config_from_dict(values, overrides)
    # The weights come from the checkpoint: never load (or download) the ones the config names.
    model = build_model(replace(cfg.model, weights="none", backbone=replace(cfg.model.backbone, weights="none")))
    try:
        load_state_dict_checked(model, state["model"], str(path), hint="the model of the checkpoint's config")
    except WeightsError as error:
        raise CheckpointError(str(error)) from None
    device = resolve_device(cfg.eval.device, key="eval.device")
    model.to(device).eval()
    return LoadedModel(config=cfg, model=model, device=device,
                       categories=checked_categories(state.get("categories"), cfg.model.num_classes, path))


def checked_categories(categories, num_classes: int, path: str | Path) -> list[dict]:
    """A checkpoint's "categories" as [{"id": int, "name": str}] of labels 1..num_classes, checked when it is
    loaded (None: it has none, named "class k"); a CheckpointError naming `path` for anything else."""
    if categories is None:
        return [{"id": k, "name": f"class {k}"} for k in range(1, num_classes + 1)]
    if not isinstance(categories, list) or len(categories) != num_classes:
        count = len(categories) if isinstance(categories, list) else type(categories).__name__
        raise CheckpointError(f"{path}: its categories ({count}) do not give the {num_classes} classes of its "
                              f"model.num_classes")
    for index, category in enumerate(categories):
        if not (isinstance(category, dict) and type(category.get("id")) is int
                and isinstance(category.get("name"), str) and category["name"].strip()):
            raise CheckpointError(f"{path}: category {index} is {str(category)[:80]}, not an integer id with a name")
    if len({c["id"] for c in categories}) != num_classes:
        raise CheckpointError(f"{path}: its categories repeat an id")
    return [{"id": c["id"], "name": c["name"]} for c in categories]


def load_torchvision_model(path: str | Path) -> torch.nn.Module:
    """Our model from a file holding a torchvision `maskrcnn_resnet50_fpn` state dict, in eval mode on the CPU.

    Raises:
        CheckpointError: no such file, not a readable state dict, or not a torchvision Mask R-CNN's.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"torchvision weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged or foreign file
        raise CheckpointError(f"{path}: not a readable state dict ({_first_line(error)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a torchvision state dict")
    try:
        return from_torchvision(state)
    except WeightsError as error:
        raise CheckpointError(f"{path}: {error}") from None


def check_categories(checkpoint: str | Path, categories: list[dict], data: str | Path,
                     data_categories: list[dict]) -> None:
    """A checkpoint's classes must be the data's (by name, in label order), or its labels would mean other things.

    Raises:
        CheckpointError: they differ; names both sides and their classes.
    """
    if [c["name"] for c in categories] != [c["name"] for c in data_categories]:
        raise CheckpointError(f"{checkpoint} was trained on {describe_categories(categories)} but {data} has "
                              f"{describe_categories(data_categories)}")


class RunLock:
    """An exclusive lock on a run folder, so that two trainings cannot interleave metrics.jsonl or overwrite each
    other's checkpoints.

    The lock file holds the owner's pid (for the error message); the lock itself is an advisory `flock` on it,
    which the kernel releases when its process ends in any way (SIGKILL included), so a lock left by a dead
    process is stale by construction and is simply taken over. Use as a context manager.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._handle = None

    def __enter__(self) -> RunLock:
        import fcntl  # POSIX; imported here so that the package still imports where it is missing

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "unknown"
                handle.close()
                raise RunLockedError(f"{self.path.parent}: another training (pid {owner}) is writing to this run "
                                     f"folder (lock file {self.path}); wait for it to end or choose another "
                                     f"folder") from None
            # The previous owner may have deleted the file between our open and flock: lock the file that is there.
            try:
                current = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc_info) -> None:
        self.path.unlink(missing_ok=True)  # while still locked: nobody can take a file that is about to vanish
        self._handle.close()
        self._handle = None

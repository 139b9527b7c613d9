"""Checkpoints and the run folder's lock.

A checkpoint is a dict of tensors and plain values (numbers, strings, lists, dicts) only, so that every file is
read with `torch.load(weights_only=True)`: a crafted file cannot run code when it is loaded, and our own
checkpoints also load wherever a plain state dict is expected (`model.weights: runs/x/last.pt`).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from maskrcnn.fileio import atomic_write
from maskrcnn.model.pretrained import first_non_finite

LOCK_NAME = ".lock"  # in the run folder: the pid of the process training there


class CheckpointError(ValueError):
    """A checkpoint cannot be read (missing, damaged, unsafe, not ours, non-finite weights) or must not be written
    (non-finite weights); the message names the file."""


class RunLockedError(RuntimeError):
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

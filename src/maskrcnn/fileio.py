"""Writing and reading files so that a crash, a kill or a full disk never leaves a half-written file behind.

Low-level on purpose (standard library and `maskrcnn.errors` only): the data readers, the trainer and the report all write through it.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from maskrcnn.errors import UserError

TEMP_SUFFIX = ".tmp"  # temporary files are ".<name>.<random><TEMP_SUFFIX>" next to their target


class DiskFullError(UserError, OSError):
    """The file system ran out of space (or quota) while writing; the message names the folder and the file that
    was kept as it was."""


class JsonlError(UserError, ValueError):
    """A JSON-lines file has a bad line other than a torn last one; the message names the file and the line."""


def _is_disk_full(error: BaseException | None) -> bool:
    """True when `error` or an exception it was raised from is ENOSPC / EDQUOT (torch.save, for one, re-raises a
    failed write as a RuntimeError whose context holds the OSError)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Opens a temporary file next to `path` for writing; on leaving the block without an error it is fsync'ed and
    renamed over `path`, so `path` is always either the old file or the complete new one.

    The temporary file is in the same folder (the same file system: `os.replace` is atomic there) and is removed
    when the block raises. A kill (SIGKILL, power loss) can leave it behind; `remove_temp_files` cleans up.

    Raises:
        DiskFullError: no space left; `path` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        Path(tmp_name).unlink(missing_ok=True)
        if _is_disk_full(error):
            kept = "the previous version is kept" if path.exists() else "nothing was written"
            raise DiskFullError(f"no space left on {path.parent} while writing {path.name}; {kept}") from None
        raise


@contextmanager
def full_disk_as_error(folder: str | Path) -> Iterator[None]:
    """Turns running out of space anywhere in the block (appending to a log, saving a picture: writes that are not
    atomic) into one `DiskFullError` naming `folder`; a `DiskFullError` from `atomic_write` passes unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except BaseException as error:
        if _is_disk_full(error):
            raise DiskFullError(f"no space left on {folder}; the files written before are kept") from None
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """`Path.write_text`, atomically (see `atomic_write`)."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Deletes the temporary files `atomic_write` left in `folder` when its process was killed mid-write.

    Only call this while no other process writes into `folder` (e.g. while holding the run's lock).
    Returns the deleted paths.
    """
    removed = []
    for path in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file. A last line that does not parse is dropped: a process killed while
    appending it leaves it torn, and everything before it is intact.

    Raises:
        JsonlError: a line other than the last is not a JSON object (names the file and the line number).
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise JsonlError(f"{path}:{number}: not a JSON record (the file is damaged)") from None
        if not isinstance(record, dict):
            raise JsonlError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records

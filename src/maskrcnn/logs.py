"""The `maskrcnn` logger's one set-up: its lines on the terminal while a command runs, and in a run folder's
log.txt while a training runs. The command line and the trainer both go through here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

LOGGER = "maskrcnn"


@contextlib.contextmanager
def _attached(handlers: list[logging.Handler]) -> Iterator[None]:
    """The handlers on the `maskrcnn` logger (at INFO at least) while the block runs; closed afterwards."""
    logger = logging.getLogger(LOGGER)
    level = logger.level
    if handlers and logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(level)


def _terminal_handlers() -> list[logging.Handler]:
    """Progress on stdout; warnings on stderr as `maskrcnn: warning: ...`."""
    progress = logging.StreamHandler(sys.stdout)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    warnings = logging.StreamHandler(sys.stderr)
    warnings.setLevel(logging.WARNING)
    warnings.setFormatter(logging.Formatter("maskrcnn: warning: %(message)s"))
    return [progress, warnings]


def progress_to_terminal() -> contextlib.AbstractContextManager:
    """The logger's lines on the terminal while a command runs; in a torchrun job on rank 0 only."""
    on_rank_0 = int(os.environ.get("RANK", "0")) == 0
    return _attached(_terminal_handlers() if on_rank_0 else [])


def run_log(path: Path | None, *, to_terminal: bool) -> contextlib.AbstractContextManager:
    """While training: the logger's lines also appended to `path` (log.txt; a resumed run continues it; None:
    no file, e.g. on the ranks other than 0) and, with `to_terminal` when nobody set up the terminal (a training
    called from Python rather than the command line), on the terminal."""
    handlers: list[logging.Handler] = []
    if path is not None:
        handlers.append(logging.FileHandler(path))
        handlers[-1].setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        if to_terminal and not logging.getLogger(LOGGER).handlers:
            handlers += _terminal_handlers()
    return _attached(handlers)

"""Stopping a training cleanly: the first SIGINT / SIGTERM asks the trainer to save last.pt and return."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading


class StopSignals:
    """Turns the first SIGINT / SIGTERM into a request to stop after the current iteration (the trainer then saves
    last.pt and returns); a second one stops at once, as that signal would without this handler: SIGINT raises
    KeyboardInterrupt (exit status 130), SIGTERM raises SystemExit(143), the status a job scheduler expects. Within
    `stopping_at_once` (the final evaluation, when training is saved) the first one stops at once too. A context
    manager; outside the main thread it does nothing (Python delivers signals to the main thread only)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None  # the name of the signal that asked to stop
        self.at_once: str | None = None  # what a signal that stops at once prints (what is kept, how to go on)
        self._previous: dict = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @contextlib.contextmanager
    def stopping_at_once(self, message: str):
        """Within it, the first signal stops at once too, printing `message`."""
        self.at_once = message
        try:
            yield
        finally:
            self.at_once = None

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            # a DataLoader worker forked with this handler: the main process decides when to stop, so Ctrl-C (sent
            # to the whole process group) must not end the worker; SIGTERM keeps its default effect
            if signum == signal.SIGTERM:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        name = signal.Signals(signum).name
        if self.received is None and self.at_once is None:
            self.received = name
            print(f"\nmaskrcnn: {name}: saving last.pt after this iteration, then stopping "
                  f"(send it again to stop at once)", file=sys.stderr, flush=True)
            return
        print(f"\nmaskrcnn: {name}: {self.at_once or 'stopping at once; last.pt is the last checkpoint saved'}",
              file=sys.stderr, flush=True)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

"""Dynamic batching: concurrent requests gathered into one model call, on one model thread, behind a bounded queue.

A request first takes a place (`admit`: refused with `QueueFull` when `max_queue` requests already hold one), then
hands in its decoded item (`submit`), which waits until the model thread takes it into a batch; the place is freed
then. The model thread takes the oldest item and the others of the same key (the image size) waiting behind it, up
to `max_batch`, waiting at most `max_wait_s` after the oldest arrived for the batch to fill, and runs them as one
call. Why one key per batch: an exported graph takes images of one size per call, and an image's answer must not
depend on the requests that happened to come with it (padding a batch to a larger image changes the features near
an image's edges).

A request that stops waiting (its timeout) cancels its future; a cancelled item still in the queue is dropped
instead of run. `close` refuses new requests and returns once every queued item has been run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every place of the queue is taken (or the batcher is closing): the request is refused, not kept waiting."""


@dataclass
class _Job:
    key: Hashable  # items of one key may share a batch
    item: object
    arrived: float  # time.monotonic() when submitted
    future: Future = field(default_factory=Future)


class DynamicBatcher:
    """Runs `run_batch` on batches of submitted items, on a thread of its own.

    Args:
        run_batch: list of items (one key) -> one result per item, in order; an exception fails every item of
            the batch.
        max_batch: most items of one call.
        max_wait_s: longest wait, from the arrival of a batch's oldest item, for more items to fill it.
        max_queue: most requests holding a place (admitted and not yet taken into a batch).
        on_batch: called on the model thread after each call with (batch size, seconds of the call).
    """

    def __init__(self, run_batch: Callable[[list], list], *, max_batch: int, max_wait_s: float, max_queue: int,
                 on_batch: Callable[[int, float], None] = lambda size, seconds: None) -> None:
        self.run_batch, self.on_batch = run_batch, on_batch
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self._jobs: list[_Job] = []  # submitted, not yet taken, oldest first
        self._places = 0  # requests admitted and not yet taken into a batch (or given back)
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="model", daemon=True)

    @property
    def depth(self) -> int:
        """Requests holding a place in the queue."""
        return self._places

    def start(self) -> None:
        self._thread.start()

    def admit(self) -> None:
        """Takes a place for one request; raises QueueFull when none is left or the batcher is closing."""
        with self._changed:
            if self._closed or self._places >= self.max_queue:
                raise QueueFull(f"{self._places} requests are waiting (--max-queue {self.max_queue})")
            self._places += 1

    def leave(self) -> None:
        """Gives back the place of an admitted request that submits nothing (its input was refused)."""
        with self._changed:
            self._places -= 1

    def submit(self, key: Hashable, item: object) -> Future:
        """Queues the item of an admitted request; its future gets the item's result (or the batch's error)."""
        job = _Job(key=key, item=item, arrived=time.monotonic())
        with self._changed:
            self._jobs.append(job)
            self._changed.notify_all()
        return job.future

    def close(self) -> None:
        """Refuses new requests, runs the queued ones, then stops the model thread."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            running = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not running:
                continue
            started = time.perf_counter()
            try:
                results = self.run_batch([job.item for job in running])
            except Exception as error:  # the batch's requests answer with it; the thread goes on
                log.exception("a batch of %d failed", len(running))
                for job in running:
                    job.future.set_exception(error)
                continue
            self.on_batch(len(running), time.perf_counter() - started)
            for job, result in zip(running, results):
                job.future.set_result(result)

    def _next_batch(self) -> list[_Job] | None:
        """The next batch, taken out of the queue once full or timed out; None once closed and empty."""
        with self._changed:
            while True:
                self._drop_cancelled()
                if not self._jobs:
                    if self._closed:
                        return None
                    self._changed.wait()
                    continue
                oldest = self._jobs[0]
                batch = [job for job in self._jobs if job.key == oldest.key][: self.max_batch]
                wait = oldest.arrived + self.max_wait_s - time.monotonic()
                if len(batch) == self.max_batch or wait <= 0 or self._closed:
                    break
                self._changed.wait(wait)
            taken = set(map(id, batch))
            self._jobs = [job for job in self._jobs if id(job) not in taken]
            self._places -= len(batch)
            return batch

    def _drop_cancelled(self) -> None:
        """Frees the places of queued items whose requests stopped waiting."""
        kept = [job for job in self._jobs if not job.future.cancelled()]
        self._places -= len(self._jobs) - len(kept)
        self._jobs = kept

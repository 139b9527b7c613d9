"""Prediction as a pipeline: reading, the model, and encoding / drawing / writing run beside each other, so that the
model is never waiting and always sees batches.

    reader thread:  frames (decode images, video)        -> queue of frames (bounded)
    model thread:   batches of frames -> model (tiles batched) -> one post job per frame in a thread pool
    pool threads:   paste + RLE-encode masks (+ tile merge) -> `post` (e.g. draw and save the overlay)
    caller:         the posts' results, in input order

PyTorch, FFmpeg, Pillow's decoders and zlib release the GIL, so the stages overlap on the CPU's cores. Queues are
bounded (a few batches), so memory does not grow with the input.

Where the model computes on the CPU with a thread per core (`model_takes_every_core`), the posts of a batch and
the reading run between model calls instead, the model waiting for the posts: a thread that takes a core from one
of the model's OpenMP threads stalls the others at their next barrier, so beside the model a post cost 1.6x its
own time (once, on the shared 2-core VM: a batch of 4 Penn-Fudan photos, model 1.27 s alone, 1.55 s with 4 posts
of 44 ms beside it); between calls, on the 2 pool threads and the reader, it costs its time over 2.

Stopping early (an exception in any stage, or Ctrl-C in the caller) stops the threads; what the caller has
received so far is done.

`BatchPredictor.predict` is the same work without threads: a list of images in, a list of `Result`s out (the entry
point of a server that batches requests itself).

Shape letters: D detections, H/W an image's size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import Tensor

from maskrcnn.app.results import BoxedDetections, Result
from maskrcnn.app.sources import Frame
from maskrcnn.app.tiles import Tiling, join_windows, merge_windows, tile_windows
from maskrcnn.errors import UserError
from maskrcnn.model.mask_rle import paste_masks_rle

log = logging.getLogger(__name__)
T = TypeVar("T")
POLL_SECONDS = 0.1  # how often a blocked stage looks whether the pipeline was stopped
_END = object()  # the last item of a queue


def model_takes_every_core(detector: object) -> bool:
    """Whether the model step computes on the CPU (a `device` of type cpu, or none stated) with at least a torch
    thread per core this process may use."""
    device = getattr(detector, "device", None)
    on_cpu = device is None or torch.device(device).type == "cpu"
    return on_cpu and torch.get_num_threads() >= len(os.sched_getaffinity(0))


class BatchPredictor:
    """A model step (`detectors.CheckpointDetector` / `ExportedDetector`) with what prediction adds: the score
    threshold, tiles, and the detections as `Result`s with RLE masks.

    Args:
        detector: uint8 images -> BoxedDetections per image; has `class_names` (and `device` when not the CPU).
        score_thresh: detections scoring below this are dropped (before their masks are encoded).
        batch_size: images (or tiles of one image) per model call.
        tiling: cut each image into tiles (`tiles.Tiling`), None: whole images.
        posts_between_calls: `predict_stream` runs the posts and the reading between model calls, not beside them
            (see the module docstring); None: where `model_takes_every_core`.
    """

    def __init__(self, detector: Callable[[list[Tensor]], list[BoxedDetections]], *, score_thresh: float = 0.5,
                 batch_size: int = 4, tiling: Tiling | None = None, posts_between_calls: bool | None = None) -> None:
        self.detector = detector
        self.class_names: list[str] = list(detector.class_names)
        self.score_thresh = score_thresh
        self.batch_size = batch_size
        self.tiling = tiling
        self.posts_between_calls = model_takes_every_core(detector) if posts_between_calls is None \
            else posts_between_calls

    def size_problem(self, image: Tensor) -> str | None:
        """Why the model cannot take this image, or each of its tiles (None: it can)."""
        check = getattr(self.detector, "size_problem", None)
        if check is None:
            return None
        height, width = int(image.shape[-2]), int(image.shape[-1])
        sizes = {(y1 - y0, x1 - x0) for x0, y0, x1, y1 in tile_windows(height, width, self.tiling)} \
            if self.tiling is not None else {(height, width)}
        return next((problem for size in sorted(sizes) if (problem := check(*size)) is not None), None)

    def detect(self, images: list[Tensor]) -> list[tuple[BoxedDetections, Tensor | None]]:
        """Per uint8[3, H, W] image: its detections above the threshold in its pixels and, when tiled, the window
        i64[D] each came from (None untiled). Whole images run in one model call; tiles in batches."""
        if self.tiling is None:
            return [(detections.select(detections.scores >= self.score_thresh), None)
                    for detections in self.detector(images)]
        out = []
        for image in images:
            windows = tile_windows(image.shape[-2], image.shape[-1], self.tiling)
            crops = [image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in windows]
            per_window = [d.select(d.scores >= self.score_thresh)
                          for start in range(0, len(crops), self.batch_size)
                          for d in self.detector(crops[start:start + self.batch_size])]
            out.append(join_windows(per_window, windows))
        return out

    def to_result(self, image: Tensor, detections: BoxedDetections, window_of: Tensor | None, *,
                  keep_image: bool = False, **where) -> Result:
        """The detections of one image as a `Result` (masks encoded, tiles' duplicates merged); `where` gives
        Result's source / frame / timestamp."""
        size = (int(image.shape[-2]), int(image.shape[-1]))
        rles = paste_masks_rle(detections.masks, detections.boxes, size, mode=detections.paste_mode)
        boxes, labels, scores = detections.boxes, detections.labels, detections.scores
        if window_of is not None:
            windows = tile_windows(size[0], size[1], self.tiling)
            boxes, labels, scores, rles = merge_windows(boxes, labels, scores, rles, window_of, windows,
                                                        merge_overlap=self.tiling.merge_overlap)
        return Result(boxes=boxes, labels=labels, scores=scores, rles=rles, image_size=size,
                      class_names=self.class_names, image=image if keep_image else None, **where)

    def predict(self, images: list[Tensor], *, keep_images: bool = False) -> list[Result]:
        """uint8[3, H, W] images -> one Result each (COCO results: `Result.to_coco`), in this thread.

        Raises:
            UserError: an image the model cannot take (`size_problem`), named by its index.
        """
        for index, image in enumerate(images):
            if (problem := self.size_problem(image)) is not None:
                raise UserError(f"image {index}: {problem}")
        return [self.to_result(image, detections, window_of, keep_image=keep_images)
                for image, (detections, window_of) in zip(images, self.detect(images))]


def _put(target: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Puts `item` unless the pipeline stops first; whether it was put."""
    while not stop.is_set():
        try:
            target.put(item, timeout=POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False


def _read(frames: Iterable[Frame], out: queue.Queue, stop: threading.Event, compute: threading.Lock | None) -> None:
    """The reader thread: frames into `out`; each read holding `compute` (never while the model computes), if given."""
    try:
        iterator = iter(frames)
        while True:
            while compute is not None and not compute.acquire(timeout=POLL_SECONDS):
                if stop.is_set():
                    return
            try:
                frame = next(iterator, _END)
            finally:
                if compute is not None:
                    compute.release()
            if frame is _END:
                break
            if not _put(out, frame, stop):
                return
        _put(out, _END, stop)
    except BaseException as error:  # noqa: BLE001 -- handed to the model thread, which hands it to the caller
        _put(out, error, stop)


def _next_batch(frames: queue.Queue, size: int, stop: threading.Event) -> tuple[list, bool]:
    """The next frames, up to `size` readable ones (those that could not be read come along), and whether the
    input ended (the last item is then _END or the reader's exception). Always full batches until the end: the
    model's batch is the one asked for, whatever the pace of the reader."""
    batch: list = []
    readable = 0
    while readable < size and not stop.is_set():
        try:
            item = frames.get(timeout=POLL_SECONDS)
        except queue.Empty:
            continue
        batch.append(item)
        if item is _END or isinstance(item, BaseException):
            return batch, True
        readable += item.image is not None
    return batch, False


def _failed(error: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(error)
    return future


def _finish(predictor: BatchPredictor, post: Callable, frame: Frame,
            detections: tuple[BoxedDetections, Tensor | None] | None, keep_images: bool):
    """A pool job: the frame's Result (None for a frame that could not be read) handed to `post`."""
    result = None if detections is None else predictor.to_result(
        frame.image, *detections, keep_image=keep_images, source=frame.source, frame=frame.frame,
        timestamp=frame.timestamp)
    return post(frame, result)


def _checked(predictor: BatchPredictor, frame: Frame) -> Frame:
    """The frame, or it as unreadable (logged) when the model cannot take its size: the others still run."""
    problem = None if frame.image is None else predictor.size_problem(frame.image)
    if problem is None:
        return frame
    log.warning(f"skipped {frame.source}: {problem}")
    return dataclasses.replace(frame, image=None, error=f"{frame.source}: {problem}")


def _run_model(predictor: BatchPredictor, frames: queue.Queue, jobs: queue.Queue, pool: ThreadPoolExecutor,
               post: Callable, keep_images: bool, stop: threading.Event, compute: threading.Lock | None) -> None:
    """The model thread: batches of frames through the model, one post job per frame queued in input order; with
    `compute` (`predictor.posts_between_calls`), each call waits for the posts of the batch before and holds it."""
    try:
        ended, posting = False, []
        while not ended and not stop.is_set():
            batch, ended = _next_batch(frames, 1 if predictor.tiling else predictor.batch_size, stop)
            if ended and isinstance(batch[-1], BaseException):
                raise batch[-1]
            batch = [_checked(predictor, frame) for frame in batch if frame is not _END]
            readable = [frame for frame in batch if frame.image is not None]
            if compute is not None and readable:
                futures.wait(posting)
            with compute or contextlib.nullcontext():
                detections = iter(predictor.detect([frame.image for frame in readable]) if readable else ())
            posting = []
            for frame in batch:
                posting.append(pool.submit(_finish, predictor, post, frame,
                                           next(detections) if frame.image is not None else None, keep_images))
                if not _put(jobs, posting[-1], stop):
                    return
        _put(jobs, _END, stop)
    except BaseException as error:  # noqa: BLE001 -- the caller raises it
        _put(jobs, _failed(error), stop)


def predict_stream(frames: Iterable[Frame], predictor: BatchPredictor,
                   post: Callable[[Frame, Result | None], T] = lambda frame, result: (frame, result), *,
                   workers: int = 2, keep_images: bool = False) -> Iterator[T]:
    """`post(frame, result)` of every frame (result None where the frame could not be read), in input order,
    with reading, the model and the posts running beside each other (see the module docstring).

    Args:
        frames: e.g. `sources.read_frames(...)`; iterated in a thread of its own.
        predictor: the model step, threshold and tiling; its `batch_size` images per model call.
        post: run in a pool of `workers` threads once a frame's masks are encoded (draw, save, convert).
        keep_images: keep each image in its Result (for `Result.plot`).
    Raises:
        whatever reading, the model or `post` raised, once the frames before it have been yielded.
    """
    stop = threading.Event()
    depth = 2 * predictor.batch_size + workers  # frames waiting at each stage: bounds the memory held
    frame_queue: queue.Queue = queue.Queue(maxsize=depth)
    job_queue: queue.Queue = queue.Queue(maxsize=depth)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="maskrcnn-post")
    compute = threading.Lock() if predictor.posts_between_calls else None  # held by a model call, or by a read
    threading.Thread(target=_read, args=(frames, frame_queue, stop, compute), daemon=True,
                     name="maskrcnn-read").start()
    threading.Thread(target=_run_model, args=(predictor, frame_queue, job_queue, pool, post, keep_images, stop,
                                              compute), daemon=True, name="maskrcnn-model").start()
    try:
        while (job := job_queue.get()) is not _END:
            yield job.result()
    finally:  # also when the caller stops early (Ctrl-C, an error, a generator closed)
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)

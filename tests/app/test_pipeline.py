"""The prediction pipeline's scheduling: where the model takes every core of the CPU, the posts (encoding, drawing,
saving) and the reading run between model calls, never beside one; elsewhere beside it."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import torch

from maskrcnn.app import pipeline
from maskrcnn.app.pipeline import BatchPredictor, model_takes_every_core, predict_stream
from maskrcnn.app.results import BoxedDetections
from maskrcnn.app.sources import Frame

STEP_SECONDS = 0.02  # how long a model call and a post take here


class SlowDetector:
    """One detection per image; each call takes STEP_SECONDS, and `running` is set meanwhile."""

    class_names = ("thing",)

    def __init__(self) -> None:
        self.running = threading.Event()

    def __call__(self, images):
        self.running.set()
        time.sleep(STEP_SECONDS)
        self.running.clear()
        return [BoxedDetections(torch.tensor([[1.0, 1.0, 3.0, 3.0]]), torch.tensor([1]), torch.tensor([0.9]),
                                torch.ones(1, 4, 4)) for _ in images]


def work_during_model_calls(between: bool) -> tuple[int, int, list[int]]:
    """(posts, reads that ran while the model computed; frame numbers in the order yielded) of 6 frames in
    batches of 2."""
    detector = SlowDetector()
    in_post, in_read = [], []

    def frames():
        for number in range(1, 7):
            time.sleep(STEP_SECONDS / 4)
            in_read.append(detector.running.is_set())
            yield Frame("x.png", number, torch.zeros(3, 6, 8, dtype=torch.uint8))

    def post(frame, result):
        time.sleep(STEP_SECONDS / 2)
        in_post.append(detector.running.is_set())
        time.sleep(STEP_SECONDS / 2)
        return frame.number

    predictor = BatchPredictor(detector, batch_size=2, posts_between_calls=between)
    order = list(predict_stream(frames(), predictor, post, workers=2))
    return sum(in_post), sum(in_read), order


def test_posts_and_reading_run_between_model_calls_or_beside_them():
    """Between: not one of the 6 posts or reads runs during a model call. Beside: the 2 posts of a batch run during
    the next batch's call (both take STEP_SECONDS), so some do. Both keep the input order."""
    assert work_during_model_calls(between=True) == (0, 0, [1, 2, 3, 4, 5, 6])
    posts, _, order = work_during_model_calls(between=False)
    assert posts > 0 and order == [1, 2, 3, 4, 5, 6]


def test_which_models_take_every_core(monkeypatch):
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(pipeline.torch, "get_num_threads", lambda: 4)
    assert model_takes_every_core(SimpleNamespace(device=torch.device("cpu")))
    assert model_takes_every_core(SimpleNamespace())  # an exported model: on the CPU
    assert not model_takes_every_core(SimpleNamespace(device=torch.device("cuda", 0)))
    assert BatchPredictor(SlowDetector()).posts_between_calls  # no device stated: the CPU
    monkeypatch.setattr(pipeline.torch, "get_num_threads", lambda: 2)  # 2 of the 4 cores left to the posts
    assert not model_takes_every_core(SimpleNamespace(device=torch.device("cpu")))
    assert not BatchPredictor(SlowDetector()).posts_between_calls

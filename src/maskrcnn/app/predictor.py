"""The Python API of prediction, for notebooks and scripts:

    from maskrcnn.app.predictor import Predictor
    predictor = Predictor("run/best.pt")    # or "model.onnx" / "model.pt2"; tile=1024 for large photos
    result = predictor("street.jpg")        # a path, numpy array, tensor or PIL image
    result.boxes, result.names, result.scores, result.rles, result.polygons, result.masks
    result.plot(); result.save("street_pred.png"); result.to_coco(image_id=7)
    for frame in predictor.stream("clip.mp4", every=5): print(frame.frame, frame.timestamp, len(frame))

`predict_batch` (uint8 [3, H, W] images -> Results) is the synchronous, batched entry point a server calls.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from maskrcnn.app.pipeline import BatchPredictor, predict_stream
from maskrcnn.app.predict import load_detector
from maskrcnn.app.results import Result
from maskrcnn.app.sources import Input, collect_inputs, read_frames
from maskrcnn.app.tiles import Tiling
from maskrcnn.app.video import VideoError
from maskrcnn.data.common import DatasetError


def as_image(image: object) -> Tensor:
    """uint8[3, H, W] of an RGB image given as a numpy array [H, W, 3] (uint8), a tensor [3, H, W] (uint8, or
    float in 0..1) or a PIL image (converted to RGB)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB array [H, W, 3], got shape {image.shape}")
        image = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a copy, (H, W, 3) -> (3, H, W)
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image tensor [3, H, W], got {getattr(image, 'shape', type(image))}")
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round()
    return image.to(torch.uint8).cpu()


class Predictor:
    """A trained model ready to predict: a checkpoint (.pt) or exported file (.onnx, .pt2).

    Args:
        model: the model file.
        score_thresh: detections scoring below this are dropped.
        batch_size: images (or tiles) per model call.
        tile, overlap: predict in overlapping tiles of `tile` pixels (`tiles.Tiling`); None: whole images.
        runtime, precision, overrides: as `maskrcnn predict` takes them (`predict.load_detector`).
    """

    def __init__(self, model: str | Path, *, score_thresh: float = 0.5, batch_size: int = 4, tile: int | None = None,
                 overlap: float = 0.2, runtime: str | None = None, precision: str | None = None,
                 overrides: Sequence[str] = ()) -> None:
        self.detector = load_detector(model, runtime=runtime, precision=precision, overrides=list(overrides))
        self.batch = BatchPredictor(self.detector, score_thresh=score_thresh, batch_size=batch_size,
                                    tiling=None if tile is None else Tiling(tile, overlap))

    @property
    def class_names(self) -> list[str]:
        return self.batch.class_names

    def predict_batch(self, images: Sequence[Tensor], *, keep_images: bool = False) -> list[Result]:
        """uint8[3, H, W] images -> one Result each, in this thread, the images in model calls of `batch_size`.
        The entry point for a server: `Result.to_coco(image_id)` gives each image's COCO results."""
        size = self.batch.batch_size
        return [result for start in range(0, len(images), size)
                for result in self.batch.predict(list(images[start:start + size]), keep_images=keep_images)]

    def __call__(self, source: object) -> Result | list[Result]:
        """The Result of one image (a path, array, tensor or PIL image), or a list of Results for a list of
        images, a folder, a glob pattern or a video (every frame; `stream` yields them one by one instead)."""
        if isinstance(source, (list, tuple)):
            return self.predict_batch([as_image(image) for image in source], keep_images=True)
        if not isinstance(source, (str, Path)):
            return self.predict_batch([as_image(source)], keep_images=True)[0]
        inputs = collect_inputs([source])
        single = len(inputs) == 1 and inputs[0].kind == "image" and Path(source).is_file()
        frames = read_frames(inputs, tiled=self.batch.tiling is not None)
        results = []
        for frame, result in predict_stream(frames, self.batch, keep_images=single):
            if result is None and single:
                raise DatasetError(frame.error)
            results += [result] if result is not None else []  # unreadable files of a folder: logged, skipped
        return results[0] if single else results

    def stream(self, video: str | Path, *, every: int = 1) -> Iterator[Result]:
        """The Result of every `every`-th frame of a video file or stream URL (`frame`, `timestamp` set, the frame
        kept for `plot`), decoding and encoding beside the model; a corrupt frame is skipped with a warning.

        Raises:
            VideoError: the video cannot be opened or decoded.
        """
        frames = read_frames([Input(str(video), "video")], every=every, tiled=self.batch.tiling is not None)
        for frame, result in predict_stream(frames, self.batch, keep_images=True):
            if result is None:
                raise VideoError(frame.error)
            yield result

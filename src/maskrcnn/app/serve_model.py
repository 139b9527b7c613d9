"""The model behind `maskrcnn serve`, on prediction's own steps: `detect` (the server's model thread) is
prediction's model step (`predict.load_detector`: a checkpoint or an exported .onnx / .pt2, masks still
box-relative), `encode` (the encoding threads) is prediction's conversion (`BatchPredictor.to_result`: masks pasted
and RLE-encoded a few at a time, no [D, H, W] float tensor of the whole image; `Result.to_coco`), so that an
answer's detections are `maskrcnn predict`'s predictions.json entries for that image.

Shape letters: D detections of one image, H/W the image's size.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from maskrcnn.app.pipeline import BatchPredictor
from maskrcnn.app.predict import load_detector
from maskrcnn.app.results import BoxedDetections

MASK_FORMATS = ("rle", "polygons", "none")
WARM_UP_SIZE = (480, 640)  # (h, w) of the warm-up image: a photo's size


class ServedModel:
    """A detector of batches and the encoding of its outputs.

    Args:
        detector: prediction's model step (`detectors.CheckpointDetector` / `ExportedDetector`).
        info: what GET /info says about the model (file, runtime, precision).
    """

    def __init__(self, detector, info: dict) -> None:
        self.detector = detector
        self.steps = BatchPredictor(detector, score_thresh=0.0)  # each request applies its own threshold
        self.info = {**info, "classes": list(detector.class_names)}
        self.label_to_category_id = {label: c["id"] for label, c in enumerate(detector.categories, start=1)}

    def detect(self, images: list[Tensor]) -> list[BoxedDetections]:
        """uint8 [3, H, W] images (of one size: the batcher's batches) -> their detections, one model call."""
        return self.detector(images)

    def warm_up(self, max_batch: int) -> None:
        """Calls the model until its first-call costs are paid (oneDNN's primitives, allocations) on one image and
        on a full batch, and, for a checkpoint with model.precision auto, until the precision is chosen."""
        image = torch.randint(0, 256, (3, *WARM_UP_SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        self.detect([image])
        self.detect([image] * max_batch)
        precision = getattr(getattr(self.detector, "model", None), "precision", None)  # a checkpoint's only
        while precision is not None and precision.chosen is None:
            self.detect([image])

    def encode(self, image: Tensor, detections: BoxedDetections, *, score_thresh: float, max_detections: int | None,
               mask_format: str) -> list[dict]:
        """predictions.json's entries of one image ("category_id", "bbox" xywh, "score", "segmentation" as RLE or
        polygons, none with mask_format "none") plus "category" (the class name), without "image_id": the
        detections scoring at least `score_thresh`, the best `max_detections` of them (None: all)."""
        keep = int((detections.scores >= score_thresh).sum())  # sorted by score: the kept ones are a prefix
        keep = keep if max_detections is None else min(keep, max_detections)
        result = self.steps.to_result(image, detections.select(torch.arange(keep)), None)
        entries = result.to_coco(0, self.label_to_category_id, format="polygons" if mask_format == "polygons" else "rle")
        for entry, name in zip(entries, result.names):
            del entry["image_id"]
            entry["category"] = name
            if mask_format == "none":
                del entry["segmentation"]
        return entries


def load_served_model(path: str | Path, *, runtime: str | None = None, precision: str | None = None,
                      overrides: list[str] = ()) -> ServedModel:
    """The model of a checkpoint (.pt) or an exported file (.onnx, .pt2) for the server; `runtime`, `precision`
    and `overrides` as `maskrcnn predict` takes them.

    Raises:
        UserError: a missing or bad model file, or a runtime, precision or override that does not apply to it.
    """
    detector = load_detector(path, runtime=runtime, precision=precision, overrides=list(overrides))
    model = getattr(detector, "model", None)
    if model is not None:
        info = {"runtime": f"pytorch ({detector.device})", "precision": model.precision.setting}
    else:
        info = {"runtime": runtime or ("onnxruntime" if Path(path).suffix == ".onnx" else "pytorch (ExportedProgram)"),
                "precision": precision or "fp32"}
    return ServedModel(detector, {"model": str(path), **info})

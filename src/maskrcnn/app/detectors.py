"""The model step of prediction, for a checkpoint and for an exported file alike: a batch of uint8 images in, each
image's detections out with their box-relative masks (`BoxedDetections`), before any paste.

A checkpoint runs `MaskRCNN.detect` (the model's padded outputs, masks still M x M inside their boxes); an exported
.onnx / .pt2 file runs its graph (`Predictor.run`, the same padded outputs). Pasting and encoding come after, beside
the model (`model.mask_rle.paste_masks_rle`).

Shape letters: B images, D detections per image (padded), D_i valid ones of image i, M mask size.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from maskrcnn.app.results import BoxedDetections
from maskrcnn.engine.checkpoint import LoadedModel
from maskrcnn.engine.common import autocast, cuda_autocast, images_to_model
from maskrcnn.errors import UserError

MIN_EXPORTED_SIDE = 32  # pixels: the exported graph's smallest input side (one cell of its stride-32 level)


def split_padded(boxes: Tensor, scores: Tensor, labels: Tensor, masks: Tensor, counts: list[int],
                 paste_mode: str) -> list[BoxedDetections]:
    """Padded outputs (boxes f32[B, D, 4], scores f32[B, D], labels i64[B, D], masks f32[B, D, M, M], the valid
    rows a prefix of `counts` per image) -> B BoxedDetections on the CPU in float32."""
    return [BoxedDetections(boxes=boxes[i, :n].float().cpu(), labels=labels[i, :n].cpu(),
                            scores=scores[i, :n].float().cpu(), masks=masks[i, :n].float().cpu(),
                            paste_mode=paste_mode)
            for i, n in enumerate(counts)]


class CheckpointDetector:
    """A checkpoint's model (`checkpoint.load_model`) as the model step; on its device, in its precision."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.model = loaded.model
        self.device = loaded.device
        self.amp = cuda_autocast(loaded.config.model.precision)
        self.categories = loaded.categories
        self.class_names = [c["name"] for c in loaded.categories]
        self.paste_mode = getattr(loaded.model, "paste_mode", "exact")

    def size_problem(self, height: int, width: int) -> str | None:
        """Why an image of this size cannot be predicted (None: it can): the model's resize would give it a side
        of zero pixels (2 x 3000 at max_size 1333)."""
        resized = self.model.transform.resized_size(height, width)
        if min(resized) < 1:
            return (f"{width} x {height} pixels resizes to {resized[1]} x {resized[0]} for the model "
                    f"(model.transform min_size / max_size): too thin to predict; crop it or use --tile")
        return None

    @torch.no_grad()
    def __call__(self, images: list[Tensor]) -> list[BoxedDetections]:
        """uint8 [3, H_i, W_i] images -> their detections, in each image's pixels."""
        with autocast(self.device, self.amp):
            # the transform on its own: the float copies of the full-size images are freed once resized, before
            # the backbone runs (a 4000 x 3000 photo's peak: 157 MB less)
            detections = self.model.detect(self.model.transform(images_to_model(images, self.device))[0])
        counts = detections.valid.sum(dim=1).tolist()  # the one host sync of the batch
        return split_padded(detections.boxes, detections.scores, detections.labels, detections.masks, counts,
                            self.paste_mode)


class ExportedDetector:
    """A .onnx or .pt2 file written by `maskrcnn export` as the model step; images of one size run as one batch
    (the graph takes one size per batch), others one at a time."""

    def __init__(self, path: str | Path, *, runtime: str | None = None, precision: str | None = None) -> None:
        from maskrcnn.export import load_predictor

        try:
            self.predictor = load_predictor(path, runtime=runtime, precision=precision)
        except ImportError as error:
            extra = "openvino" if runtime == "openvino" else "export"
            raise UserError(f"{path}: running an exported model needs the optional packages of "
                            f"`pip install maskrcnn[{extra}]` ({error})") from None
        except (ValueError, FileNotFoundError) as error:  # the file is not what `maskrcnn export` writes
            raise UserError(str(error)) from None
        self.class_names = list(self.predictor.info.class_names)
        self.categories = [{"id": label, "name": name} for label, name in enumerate(self.class_names, start=1)]
        self.paste_mode = self.predictor.info.paste_mode

    def size_problem(self, height: int, width: int) -> str | None:
        """Why an image of this size cannot be predicted (None: it can): smaller than the exported graph's
        MIN_EXPORTED_SIDE on a side."""
        if min(height, width) < MIN_EXPORTED_SIDE:
            return (f"{width} x {height} pixels: an exported model takes images of at least {MIN_EXPORTED_SIDE} "
                    f"pixels a side; pad it or predict with the checkpoint")
        return None

    def __call__(self, images: list[Tensor]) -> list[BoxedDetections]:
        groups: dict[tuple, list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(index)
        results: list[BoxedDetections | None] = [None] * len(images)
        for indices in groups.values():
            batch = torch.stack([images[i] for i in indices]).float().div_(255.0)  # (b, 3, H, W) in 0..1
            outputs = self.predictor.run(batch)
            counts = outputs["num_detections"].tolist()
            for i, detections in zip(indices, split_padded(outputs["boxes"], outputs["scores"], outputs["labels"],
                                                           outputs["masks"], counts, self.paste_mode)):
                results[i] = detections
        return results

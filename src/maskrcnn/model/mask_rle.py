"""Masks in bounded memory: each detection's M x M mask pasted into the pixels its box can reach and encoded to
COCO RLE at its offset, never a dense [D, H, W] mask of the image (MLPerf's "virtual paste"); and the model's
compact output forms built on it.

`paste_masks_rle` gives, bit for bit, the RLE of `paste_masks` followed by `probability >= threshold`: the
window of each mask is cut from the same interpolation weights (`postprocess.paste_weights`) and multiplied by
the same matrix products, only over fewer pixels. Memory: one window of floats at a time (at most one image's
h x w) plus the weights of a chunk of detections, whatever D.

Why windows are at least MIN_WINDOW pixels a side: MKL computes matrices of a few rows or columns with other
kernels than the whole image's product (measured here: fewer than 4 rows or 12 columns on one thread, fewer
than 12 rows on two), whose sums of the same products differ in the last bit; pixels next to 0.5 would then
flip. A window grown to MIN_WINDOW (clipped to the image) takes the kernels of the dense paste.

Compact forms (`MASK_FORMATS`), for `MaskRCNN.inference(images, masks=...)` and the exported predictors:
- "dense": torchvision's contract, "masks" f32[D, 1, H, W] probabilities (the default).
- "rle": "masks" is a list of D COCO RLE dicts {"size": [H, W], "counts": str} of probability >= 0.5.
- "boxed": "masks" is a `BoxMasks`: the box-relative probabilities with their boxes, pasted on demand
  (`.rle()`, `.dense()`), as detectron2's `ROIMasks`.

Shape letters: D detections of one image, M mask size, h/w the window of one mask, H/W image size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

from maskrcnn.model.box_head import Detections
from maskrcnn.model.postprocess import (
    PASTE_CHUNK_BYTES,
    PASTE_MODES,
    detections_per_image,
    paste_masks,
    paste_support,
    paste_weights,
    unpad,
)

MASK_FORMATS = ("dense", "rle", "boxed")
# least window side (pixels) a mask is pasted into; see the module docstring
MIN_WINDOW = 64


def paste_masks_rle(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], *, mode: str = "exact",
                    threshold: float = 0.5, chunk_bytes: int = PASTE_CHUNK_BYTES) -> list[dict]:
    """COCO RLEs of masks pasted into their boxes in one image and thresholded, without the dense masks.

    Equal to `masks_to_rle((paste_masks(masks, boxes, [D], [image_size], mode)[0][:, 0] >= threshold)
    .numpy().astype(uint8))` (computed on the CPU, as that paste is there).

    Args:
        masks: f32[D, M, M] (or [D, 1, M, M]) probabilities relative to each box.
        boxes: f32[D, 4] xyxy in the image's pixels.
        image_size: (H, W) of the image.
        mode: "exact" or "torchvision" (see `postprocess`).
        threshold: pixels with probability >= threshold are in the mask.
        chunk_bytes: bound on the interpolation weights of one chunk of detections (as `paste_masks`).
    Returns:
        D dicts {"size": [H, W], "counts": str} (COCO's compressed RLE, column-major, JSON-ready).
    """
    if mode not in PASTE_MODES:
        raise ValueError(f"paste_masks_rle: mode must be one of {PASTE_MODES}, got {mode!r}")
    if masks.shape[0] == 0:
        return []
    masks = masks.reshape(masks.shape[0], masks.shape[-2], masks.shape[-1]).float().cpu()  # (D, M, M)
    boxes = boxes.float().cpu()
    height, width = image_size
    mask_size = masks.shape[-1]
    top, rows = _windows(boxes[:, 1], boxes[:, 3], height, mask_size, mode)  # (D,), (D,)
    left, cols = _windows(boxes[:, 0], boxes[:, 2], width, mask_size, mode)
    rows_max, cols_max = int(rows.max()), int(cols.max())
    chunk = max(1, chunk_bytes // (4 * 4 * (rows_max + cols_max + 1) * mask_size))  # as in paste_masks
    counts = []
    for start in range(0, masks.shape[0], chunk):
        part = slice(start, start + chunk)
        wy = paste_weights(boxes[part, 1], boxes[part, 3], top[part, None] + torch.arange(rows_max), mask_size,
                           mode)  # (c, rows_max, M)
        wx = paste_weights(boxes[part, 0], boxes[part, 2], left[part, None] + torch.arange(cols_max), mask_size,
                           mode)  # (c, cols_max, M)
        for k, index in enumerate(range(start, min(start + chunk, masks.shape[0]))):
            h, w = int(rows[index]), int(cols[index])
            # float32 also under bf16 autocast, as paste_masks; the same two products over the window's pixels
            with torch.autocast("cpu", enabled=False):
                window = wy[k, :h] @ (masks[index] @ wx[k, :w].T)  # (h, M) @ ((M, M) @ (M, w)) -> (h, w)
            counts.append(window_rle_counts(window >= threshold, (int(top[index]), int(left[index])), image_size))
    return compress_rle_counts(counts, image_size)


def _windows(starts: Tensor, ends: Tensor, length: int, mask_size: int, mode: str) -> tuple[Tensor, Tensor]:
    """First pixel and size i64[D] of each window along one axis: the paste's support, grown to
    min(MIN_WINDOW, length) pixels inside the image (it still holds the support)."""
    first, stop = paste_support(starts, ends, length, mask_size, mode)
    size = (stop - first).clamp(min=min(MIN_WINDOW, length))
    return torch.minimum(first, length - size), size


def window_rle_counts(window: Tensor, offset: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """Uncompressed COCO RLE counts (u32, runs of 0s and 1s alternating, 0s first, column-major) of an H x W
    mask that is `window` bool[h, w] at `offset` (top, left) and 0 everywhere else."""
    (top, left), (height, width) = offset, image_size
    h, w = window.shape
    columns = np.zeros((w, h + 2), dtype=np.int8)  # (w, 1 + h + 1): each column of the window between 0s
    columns[:, 1:-1] = window.T.numpy()
    edges = np.diff(columns, axis=1)  # (w, h + 1): +1 where a run of 1s starts, -1 after it ends
    col, row = np.nonzero(edges)  # in column-major order of the image
    pixel = (left + col) * height + top + row  # index in the image's column-major order
    rising = edges[col, row] == 1
    starts, stops = pixel[rising], pixel[~rising]
    # a run reaching the bottom of a column goes on at the top of the next one when the window spans the height
    joined = np.flatnonzero(stops[:-1] == starts[1:])  # run i ends where run i + 1 starts: one run
    starts, stops = np.delete(starts, joined + 1), np.delete(stops, joined)
    bounds = np.empty(2 * len(starts), dtype=np.int64)
    bounds[0::2], bounds[1::2] = starts, stops
    counts = np.diff(bounds, prepend=0, append=height * width)
    if len(counts) > 1 and counts[-1] == 0:
        counts = counts[:-1]  # pycocotools ends with the last run, never with an empty one
    return counts.astype(np.uint32)


def compress_rle_counts(counts: Sequence[np.ndarray], image_size: tuple[int, int]) -> list[dict]:
    """Uncompressed counts of masks of one image -> COCO's compressed RLE dicts with str counts (pycocotools)."""
    if not counts:
        return []
    height, width = image_size
    rles = mask_utils.frPyObjects([{"size": [height, width], "counts": c} for c in counts], height, width)
    return [{"size": rle["size"], "counts": rle["counts"].decode("ascii")} for rle in rles]


@dataclasses.dataclass(frozen=True)
class BoxMasks:
    """The masks of one image's detections as the model computes them: M x M probabilities inside each box,
    pasted only when asked (like detectron2's `ROIMasks`). `masks[keep]` selects detections.

    Attributes:
        probabilities: f32[D, M, M] relative to each box.
        boxes: f32[D, 4] xyxy in the image's pixels.
        image_size: (H, W) of the image.
        mode: the paste, "exact" or "torchvision" (see `postprocess`).
    """

    probabilities: Tensor
    boxes: Tensor
    image_size: tuple[int, int]
    mode: str = "exact"

    def __len__(self) -> int:
        return self.probabilities.shape[0]

    def __getitem__(self, index) -> BoxMasks:
        keep = torch.as_tensor(index) if isinstance(index, (list, tuple)) else index
        probabilities, boxes = self.probabilities[keep], self.boxes[keep]
        if probabilities.dim() == 2:  # one integer index: keep the detection dimension
            probabilities, boxes = probabilities[None], boxes[None]
        return dataclasses.replace(self, probabilities=probabilities, boxes=boxes)

    def rle(self, threshold: float = 0.5) -> list[dict]:
        """D COCO RLE dicts {"size": [H, W], "counts": str} of probability >= threshold (`paste_masks_rle`)."""
        return paste_masks_rle(self.probabilities, self.boxes, self.image_size, mode=self.mode, threshold=threshold)

    def dense(self) -> Tensor:
        """f32[D, 1, H, W] probabilities pasted into the image: torchvision's "masks" (4 H W bytes a detection)."""
        return paste_masks(self.probabilities, self.boxes, [len(self)], [self.image_size], mode=self.mode)[0]


def detections_in_format(detections: Detections, original_sizes: Sequence[tuple[int, int]],
                         paste_mode: str = "exact", masks: str = "dense") -> list[dict]:
    """Padded detections of a batch -> one dict per image with its masks in the format `masks` (MASK_FORMATS).

    Args:
        detections: from `MaskRCNN.detect`: boxes f32[B, D, 4] in original-image pixels, masks f32[B, D, M, M].
        original_sizes: B (h, w) of the images the detections belong to.
        paste_mode: "exact" or "torchvision".
        masks: "dense" (`detections_per_image`: f32[D_i, 1, h, w]), "rle" (D_i RLE dicts of probability >= 0.5)
            or "boxed" (a `BoxMasks`).
    Returns:
        B dicts {"boxes" f32[D_i, 4], "labels" i64[D_i], "scores" f32[D_i], "masks" in that format}.
    """
    if masks not in MASK_FORMATS:
        raise ValueError(f"masks must be one of {MASK_FORMATS}, got {masks!r}")
    if masks == "dense":
        return detections_per_image(detections, original_sizes, paste_mode)
    counts = detections.valid.sum(dim=1).tolist()  # the host sync of this stage: the output sizes
    outputs = []
    for boxes, labels, scores, probabilities, size in zip(*(unpad(t, counts) for t in (
            detections.boxes, detections.labels, detections.scores, detections.masks)), original_sizes):
        box_masks = BoxMasks(probabilities, boxes, tuple(size), paste_mode)
        outputs.append({"boxes": boxes, "labels": labels, "scores": scores,
                        "masks": box_masks.rle() if masks == "rle" else box_masks})
    return outputs

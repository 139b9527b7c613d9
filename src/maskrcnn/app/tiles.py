"""Large images predicted in overlapping tiles: the grid of windows, the tiles' detections moved into the whole
image's pixels, and the duplicates of one object seen by several tiles merged into one detection.

Why not sahi: its slicing is a few lines, and its merging works on boxes, or on dense full-image masks (the memory
this package avoids); here the merge works on COCO RLEs, with pycocotools' intersections and unions.

How the merge works: the detections of all windows (the tiles and, by default, the whole image shrunk to the
model's size, which sees the objects larger than a tile) are visited by score. Each one not yet taken starts a
group; from every other window it takes the best-scoring not-yet-taken detection of the same class whose mask
agrees with the group's in the pixels both see (the candidate's window and the group's windows): intersection over
the smaller of the two masks there at least `Tiling.merge_overlap`. Only the shared pixels count because each
window sees only its part of an object cut by its edge: two parts of one object agree where both windows see it,
however little of each part that is. Windows are visited again until none adds to the group (an object can reach
one tile through a third). A group becomes one detection: the union of its masks, the union of its boxes, the best
score. Detections of one window are never merged with each other: the model's own NMS has already decided between
them.

Shape letters: D detections, T windows, H/W the whole image's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

from maskrcnn.app.results import BoxedDetections
from maskrcnn.engine.coco_results import counts_str


@dataclass(frozen=True)
class Tiling:
    """How an image is cut into tiles."""

    size: int  # side of a square tile in pixels (a tile is smaller where the image is)
    overlap: float = 0.2  # fraction of `size` that neighbouring tiles share, in [0, 1)
    merge_overlap: float = 0.5  # from this intersection over the smaller mask (in the pixels both windows see)
    # two windows' detections are one object
    whole_image: bool = True  # also predict on the whole image, for the objects larger than a tile

    def __post_init__(self) -> None:
        if self.size < 32:
            raise ValueError(f"--tile {self.size}: a tile must be at least 32 pixels")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"--overlap {self.overlap}: must be at least 0 and below 1")


def tile_starts(length: int, size: int, overlap: float) -> list[int]:
    """First pixels of the tiles along one side of `length` pixels: a step of round(size * (1 - overlap)), the
    last tile moved back to end at the image's edge (so it overlaps its neighbour more, never less)."""
    if length <= size:
        return [0]
    step = max(1, round(size * (1 - overlap)))
    return [*range(0, length - size, step), length - size]


def tile_windows(height: int, width: int, tiling: Tiling) -> list[tuple[int, int, int, int]]:
    """The tiles of an image as (x0, y0, x1, y1) pixel windows, row by row (plus the whole image last when
    `tiling.whole_image` and the image is larger than one tile)."""
    windows = [(x0, y0, min(x0 + tiling.size, width), min(y0 + tiling.size, height))
               for y0 in tile_starts(height, tiling.size, tiling.overlap)
               for x0 in tile_starts(width, tiling.size, tiling.overlap)]
    if tiling.whole_image and len(windows) > 1:
        windows.append((0, 0, width, height))
    return windows


def join_windows(detections: list[BoxedDetections], windows: list[tuple[int, int, int, int]]) -> tuple[
        BoxedDetections, Tensor]:
    """The detections of every window, boxes moved by the window's corner into the whole image's pixels (the
    box-relative masks move with their boxes), in one BoxedDetections; and the window index i64[D] of each."""
    offsets = [torch.tensor([x0, y0, x0, y0], dtype=torch.float32) for x0, y0, _, _ in windows]
    joined = BoxedDetections(
        boxes=torch.cat([d.boxes + offset for d, offset in zip(detections, offsets)]),
        labels=torch.cat([d.labels for d in detections]), scores=torch.cat([d.scores for d in detections]),
        masks=torch.cat([d.masks for d in detections]), paste_mode=detections[0].paste_mode)
    window_of = torch.cat([torch.full((len(d.scores),), i, dtype=torch.int64) for i, d in enumerate(detections)])
    return joined, window_of


def _rectangles(windows: list[tuple[int, int, int, int]], image_size: tuple[int, int]) -> list[dict]:
    """The RLE of every (x0, y0, x1, y1) window in an image of (H, W)."""
    xywh = np.array([[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in windows], dtype=np.float64)
    return mask_utils.frPyObjects(xywh, *image_size)


def _overlap_over_smaller(a: dict, b: dict, seen: dict) -> float:
    """|a & b| / min(|a & seen|, |b & seen|) of two RLE masks in the pixels `seen` (0 when a part is empty)."""
    smaller = min(float(mask_utils.area(mask_utils.merge([m, seen], intersect=True))) for m in (a, b))
    if smaller == 0:
        return 0.0
    return float(mask_utils.area(mask_utils.merge([a, b], intersect=True))) / smaller


def _grow_group(seed: int, boxes: Tensor, labels: Tensor, scores: Tensor, rles: list[dict], window_of: Tensor,
                rectangles: list[dict], taken: Tensor, merge_overlap: float) -> tuple[Tensor, dict]:
    """The box and mask of the group `seed` starts (see the module docstring); marks its members in `taken`."""
    taken[seed], mask, box, windows = True, rles[seed], boxes[seed].clone(), {int(window_of[seed])}
    grown = True
    while grown:
        grown = False
        for window in sorted(set(range(len(rectangles))) - windows):
            # the free detections of this window whose box touches the group's (the others are never compared)
            free = (~taken & (window_of == window) & (labels == labels[seed]) & (boxes[:, 0] < box[2])
                    & (box[0] < boxes[:, 2]) & (boxes[:, 1] < box[3]) & (box[1] < boxes[:, 3]))
            candidates = free.nonzero()[:, 0].tolist()
            if not candidates:
                continue
            seen = mask_utils.merge([mask_utils.merge([rectangles[w] for w in windows], intersect=False),
                                     rectangles[window]], intersect=True)  # pixels both the group and it see
            agreeing = [j for j in candidates if _overlap_over_smaller(mask, rles[j], seen) >= merge_overlap]
            if agreeing:
                best = max(agreeing, key=lambda j: (float(scores[j]), -j))  # the first of the best-scoring
                taken[best], grown = True, True
                windows.add(window)
                mask = mask_utils.merge([mask, rles[best]], intersect=False)
                box = torch.cat([torch.minimum(box[:2], boxes[best, :2]), torch.maximum(box[2:], boxes[best, 2:])])
    return box, {**mask, "counts": counts_str(mask["counts"])}


def merge_windows(boxes: Tensor, labels: Tensor, scores: Tensor, rles: list[dict], window_of: Tensor,
                  windows: list[tuple[int, int, int, int]], *,
                  merge_overlap: float) -> tuple[Tensor, Tensor, Tensor, list[dict]]:
    """The detections of overlapping windows with each object's duplicates merged (see the module docstring).

    Args:
        boxes: f32[D, 4] xyxy, labels: i64[D], scores: f32[D], rles: D RLEs, all in the whole image's pixels.
        window_of: i64[D] the window each detection came from, an index into `windows`.
        windows: the T windows (x0, y0, x1, y1) of the image (`tile_windows`).
        merge_overlap: intersection over the smaller mask, in the pixels both windows see, from which two
            detections are one object.
    Returns:
        boxes, labels, scores, rles of the merged detections, highest score first.
    """
    if not rles:
        return boxes[:0], labels[:0], scores[:0], []
    rectangles = _rectangles(windows, tuple(rles[0]["size"]))
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    taken = torch.zeros(len(order), dtype=torch.bool)
    merged = []
    for seed in order:
        if not taken[seed]:
            box, mask = _grow_group(seed, boxes, labels, scores, rles, window_of, rectangles, taken,
                                    merge_overlap)
            merged.append((box, labels[seed], scores[seed], mask))
    return (torch.stack([m[0] for m in merged]), torch.stack([m[1] for m in merged]),
            torch.stack([m[2] for m in merged]), [m[3] for m in merged])

"""Boxes and masks drawn on images (torchvision.utils.draw_bounding_boxes / draw_segmentation_masks).

Every function takes and returns uint8 [3, H, W] images on the CPU, so the results can be saved or stacked.
Shape letters: D drawn items, H/W image size.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib import font_manager
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

BLEND_ROWS = 256  # rows of an image blended with its masks at a time (float copies of a band, not of a 12 MP photo)
PROPOSAL_COLOR = (255, 215, 0)  # RPN proposals: one colour, they have no class
# Labels are white text on black: readable on any photo, whatever the box's colour.
LABEL_STYLE = {"fill_labels": True, "label_colors": (255, 255, 255), "label_background_colors": (0, 0, 0)}
# What each detection or object turned out to be in the error analysis (`maskrcnn.engine.analysis`): green for a
# match, a distinct colour for each error type.
KIND_COLORS = {"tp": (0, 170, 60), "cls": (255, 140, 0), "loc": (240, 210, 0), "both": (170, 80, 230),
               "dupe": (0, 190, 230), "bkg": (230, 30, 30), "ignored": (150, 150, 150), "missed": (255, 0, 200)}


def class_colors(num_classes: int) -> list[tuple[int, int, int]]:
    """One RGB colour per foreground class (label k -> colors[k-1]), from matplotlib's tab10 / tab20 palette."""
    cmap = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
    return [tuple(int(255 * c) for c in cmap(k % cmap.N)[:3]) for k in range(num_classes)]


def _font(image: Tensor) -> dict:
    """Label font arguments: matplotlib's bundled DejaVu Sans (always installed with matplotlib) scaled to the
    image; torchvision's built-in bitmap font cannot be resized."""
    path = font_manager.findfont("DejaVu Sans", fallback_to_default=True)
    return {"font": path, "font_size": max(8, min(image.shape[-2:]) // 16)}


def draw_proposals(image: Tensor, proposals: Tensor, *, top_n: int = 20, width: int = 1) -> Tensor:
    """The `top_n` first proposals (they are sorted by objectness) as boxes in one colour.

    Args:
        image: uint8 [3, H, W].
        proposals: f32 [P, 4] xyxy in image pixels, highest objectness first.
        top_n: how many to draw.
        width: line width.
    Returns:
        uint8 [3, H, W].
    """
    boxes = proposals[:top_n].detach().float().cpu()
    if boxes.shape[0] == 0:
        return image.clone()
    return draw_bounding_boxes(image, boxes, colors=[PROPOSAL_COLOR] * boxes.shape[0], width=width)


def draw_detections(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor | None,
    *,
    class_names: list[str],
    masks: Tensor | None = None,
    score_thresh: float = 0.0,
    alpha: float = 0.5,
    width: int = 2,
) -> Tensor:
    """Detections in their class colours: optional masks underneath, boxes labelled "name score" on top.

    Args:
        image: uint8 [3, H, W].
        boxes: f32 [D, 4] xyxy; labels: i64 [D] in 1..K; scores: f32 [D] or None (ground truth: names only).
        class_names: K names.
        masks: f32 [D, 1, H, W] probabilities or bool/uint8 [D, H, W]; drawn where >= 0.5. None: boxes only.
        score_thresh: detections scoring below this are not drawn.
        alpha: mask opacity.
        width: box line width.
    Returns:
        uint8 [3, H, W].
    """
    keep = torch.ones(boxes.shape[0], dtype=torch.bool) if scores is None else scores.detach().cpu() >= score_thresh
    boxes, labels = boxes.detach().float().cpu()[keep], labels.detach().cpu()[keep]
    colors = class_colors(len(class_names))
    item_colors = [colors[int(label) - 1] for label in labels]
    out = image.clone()
    if masks is not None and keep.any():
        binary = masks.detach().cpu()[keep]
        binary = (binary[:, 0] if binary.ndim == 4 else binary).float() >= 0.5  # (D, 1, H, W) -> (D, H, W)
        out = draw_segmentation_masks(out, binary, alpha=alpha, colors=item_colors)
    if boxes.shape[0] == 0:
        return out
    names = [class_names[int(label) - 1] for label in labels]
    if scores is not None:
        names = [f"{name} {score:.2f}" for name, score in zip(names, scores.detach().cpu()[keep].tolist())]
    return draw_bounding_boxes(out, boxes, labels=names, colors=item_colors, width=width, **_font(image), **LABEL_STYLE)


def rle_pixels(rle: dict) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) i64[A] of the A pixels of a COCO RLE mask, read from its runs: time and memory in the mask's
    area, where `pycocotools.mask.decode` writes the whole H x W image (70 ms for one mask of a 12 MP photo)."""
    height = rle["size"][0]
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):  # COCO's compressed string: 5 bits a character, each run relative
        counts = _decompress_counts(counts.encode("ascii") if isinstance(counts, str) else counts)
    ends = np.cumsum(np.asarray(counts, dtype=np.int64))
    starts, stops = (ends - np.asarray(counts, dtype=np.int64))[1::2], ends[1::2]  # runs of ones: odd runs
    lengths = stops - starts
    # flat column-major indices of every pixel of every run of ones
    flat = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
    return flat % height, flat // height


def _decompress_counts(text: bytes) -> list[int]:
    """Run lengths of a compressed COCO RLE string (pycocotools' rleFrString)."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value = shift = 0
        more = True
        while more:
            char = text[position] - 48
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            position += 1
            shift += 5
            if not more and char & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def draw_rle_detections(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor,
    rles: list[dict],
    *,
    class_names: list[str],
    alpha: float = 0.5,
    width: int = 2,
) -> Tensor:
    """`draw_detections` of masks given as COCO RLEs (what prediction keeps): the same picture, pixel for pixel,
    painted from each mask's runs (`rle_pixels`) instead of D dense H x W masks.

    Args:
        image: uint8 [3, H, W]. boxes: f32 [D, 4] xyxy; labels: i64 [D] in 1..K; scores: f32 [D].
        rles: D COCO RLEs of the image's size. class_names: K names. alpha: mask opacity. width: box line width.
    Returns:
        uint8 [3, H, W].
    """
    if not rles:
        return image.clone()
    colors = class_colors(len(class_names))
    item_colors = [colors[int(label) - 1] for label in labels]
    painted = image.clone()
    covered = torch.zeros(image.shape[-2:], dtype=torch.int16)  # masks over each pixel, to blacken overlaps
    for rle, color in zip(rles, item_colors):
        rows, cols = (torch.from_numpy(index) for index in rle_pixels(rle))
        painted[:, rows, cols] = torch.tensor(color, dtype=torch.uint8)[:, None]
        covered.index_put_((rows, cols), torch.ones(len(rows), dtype=torch.int16), accumulate=True)
    painted[:, covered > 1] = 0  # as draw_segmentation_masks: overlapping masks in black
    out = torch.empty_like(image)
    for top in range(0, image.shape[-2], BLEND_ROWS):  # its float blend, a band of rows at a time
        band = slice(top, top + BLEND_ROWS)
        out[:, band] = (image[:, band] * (1 - alpha) + painted[:, band] * alpha).to(torch.uint8)
    del painted, covered  # before draw_bounding_boxes makes its PIL copies of the image (60 MB for 12 MP)
    names = [f"{class_names[int(label) - 1]} {score:.2f}" for label, score in zip(labels, scores.tolist())]
    return draw_bounding_boxes(out, boxes.float(), labels=names, colors=item_colors, width=width, **_font(image),
                               **LABEL_STYLE)


def draw_marked(
    image: Tensor,
    boxes: Tensor,
    texts: list[str],
    box_colors: list[tuple[int, int, int]],
    *,
    masks: Tensor | None = None,
    mask_colors: list[tuple[int, int, int]] | None = None,
    alpha: float = 0.45,
    width: int = 2,
) -> Tensor:
    """Boxes in given colours (e.g. the error type's) with readable labels, over optional masks.

    Args:
        image: uint8 [3, H, W].
        boxes: f32 [D, 4] xyxy; texts: D labels; box_colors: D RGB colours.
        masks: bool [D, H, W] or None; mask_colors: D RGB colours (needed with masks).
        alpha: mask opacity.
        width: box line width.
    Returns:
        uint8 [3, H, W].
    """
    out = image.clone()
    if masks is not None and masks.shape[0] > 0:
        out = draw_segmentation_masks(out, masks.bool(), alpha=alpha, colors=mask_colors)
    if boxes.shape[0] == 0:
        return out
    return draw_bounding_boxes(out, boxes.float(), labels=texts, colors=box_colors, width=width, **_font(image),
                               **LABEL_STYLE)


def draw_masks(
    image: Tensor, masks: Tensor, labels: Tensor, scores: Tensor, *, class_names: list[str], score_thresh: float = 0.0,
    alpha: float = 0.6,
) -> Tensor:
    """Masks only, in class colours (the MaskHead picture). Args as `draw_detections`; masks are drawn where the
    probability is >= 0.5. Returns uint8 [3, H, W]."""
    keep = scores.detach().cpu() >= score_thresh
    if not keep.any():
        return image.clone()
    labels = labels.detach().cpu()[keep]
    binary = masks.detach().cpu()[keep]
    binary = (binary[:, 0] if binary.ndim == 4 else binary).float() >= 0.5  # (D, 1, H, W) -> (D, H, W)
    colors = class_colors(len(class_names))
    return draw_segmentation_masks(image, binary, alpha=alpha, colors=[colors[int(k) - 1] for k in labels])


def save_png(image: Tensor, path: str | Path, *, compress_level: int = 6) -> Path:
    """Writes uint8 [3, H, W] as a PNG (creating the folder); returns the path. compress_level: zlib's 0-9 (1: a
    third of the time of the default 6, files a few % larger on photos: what prediction's overlays use)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))  # (3, H, W) -> (H, W, 3)
    image.save(path, compress_level=compress_level)
    return path


def side_by_side(images: list[Tensor], gap: int = 4) -> Tensor:
    """Pads uint8 [3, H_i, W_i] images to one height and joins them left to right with white gaps."""
    height = max(image.shape[-2] for image in images)
    padded = []
    for i, image in enumerate(images):
        canvas = torch.full((3, height, image.shape[-1] + (gap if i < len(images) - 1 else 0)), 255, dtype=torch.uint8)
        canvas[:, : image.shape[-2], : image.shape[-1]] = image
        padded.append(canvas)
    return torch.cat(padded, dim=-1)

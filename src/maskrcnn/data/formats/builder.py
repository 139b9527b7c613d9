"""What every source format shares: the COCO dict being built, polygons of ellipses, and what a conversion returns.

Coordinates are COCO's: continuous pixel-edge coordinates, pixel (x, y) covering [x, x + 1) x [y, y + 1), which is
what LabelMe, CVAT and Ultralytics store (their canvases place pixel x at [x, x + 1)). An instance keeps its polygons
when they all lie inside its image (within POLYGON_TOLERANCE_PX); masks, and polygons reaching further out, are
stored as the compressed RLE of the instance's pixels inside the image. Box and area always come from the mask.

Shape letters: H/W image height/width.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils

from maskrcnn.data.common import DatasetError, read_size

# How far (px) a polygon point may lie outside its image and still be kept as a polygon (COCO's own polygons reach
# a fraction of a pixel out); `data check` reports points further out.
POLYGON_TOLERANCE_PX = 1.0

# Largest distance (px) between an ellipse and the polygon that stands for it.
ELLIPSE_TOLERANCE_PX = 0.1

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class Conversion:
    """A source data set converted to COCO."""

    coco: dict  # COCO instances dict: images (sizes read from the files), annotations, categories
    images_dir: Path  # folder the images' file_names are relative to (give it to `data check --images`)
    skipped: dict[str, int] = field(default_factory=dict)  # shapes that are no regions (lines, points...), by type
    dropped: list[str] = field(default_factory=list)  # instances with no pixel inside their image, each named


def ellipse_polygon(cx: float, cy: float, rx: float, ry: float, angle_degrees: float = 0.0) -> list[float]:
    """A flat [x0, y0, x1, y1, ...] polygon of the ellipse with centre (cx, cy), radii rx, ry, turned clockwise on
    screen by `angle_degrees`. Enough vertices that the chords stay within ELLIPSE_TOLERANCE_PX of the curve, and
    radii scaled so that the polygon's area is the ellipse's (inscribed chords alone would shrink it)."""
    radius = max(rx, ry)
    if radius <= ELLIPSE_TOLERANCE_PX:
        count = 8
    else:
        count = max(8, math.ceil(math.pi / math.acos(1 - ELLIPSE_TOLERANCE_PX / radius)))
    scale = math.sqrt((2 * math.pi / count) / math.sin(2 * math.pi / count))  # polygon area = ellipse area
    angles = np.arange(count) * (2 * math.pi / count)
    x, y = rx * scale * np.cos(angles), ry * scale * np.sin(angles)
    turn = math.radians(angle_degrees)
    xs = cx + x * math.cos(turn) - y * math.sin(turn)
    ys = cy + x * math.sin(turn) + y * math.cos(turn)
    return np.stack([xs, ys], axis=1).ravel().tolist()


def rectangle_polygon(x1: float, y1: float, x2: float, y2: float) -> list[float]:
    """The 4 corners of the axis-aligned box between two opposite corners, clockwise from the top left."""
    left, right, top, bottom = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
    return [left, top, right, top, right, bottom, left, bottom]


def finite_numbers(values: object) -> list[float] | None:
    """`values` as floats when it is a list of finite numbers (JSON's, not bools), else None."""
    if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        return None
    return [float(v) for v in values]


class CocoBuilder:
    """Collects images and instances into a COCO dict; ids are 1, 2, ... in the order they are added.

    Args:
        categories: category id -> name, every class of the source (unused ones included, so that two splits
            converted apart have the same classes).
        images_dir: folder the images' file_names are made relative to.
    """

    def __init__(self, categories: dict[int, str], images_dir: Path):
        self.images_dir = Path(images_dir)
        self.categories = [{"id": cid, "name": name, "supercategory": name} for cid, name in categories.items()]
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.skipped: Counter[str] = Counter()
        self.dropped: list[str] = []

    def add_image(self, file: Path, where: object, stated_size: tuple[object, object] | None = None) -> dict:
        """Adds the image `file` (inside images_dir) with the size read from the file; returns its record.

        Args:
            where: the annotation file (and entry) that names the image, for messages.
            stated_size: (height, width) the annotation file says, checked against the file's when given.
        Raises:
            DatasetError: the file lies outside images_dir, is missing or unreadable, or has another size.
        """
        relative = os.path.relpath(os.path.normpath(file), os.path.normpath(self.images_dir))
        if relative == ".." or relative.startswith(".." + os.sep) or os.path.isabs(relative):
            raise DatasetError(f"{where}: image {file} lies outside the images folder {self.images_dir}")
        try:
            height, width = read_size(Path(file))
        except DatasetError as error:
            raise DatasetError(f"{where}: {error}") from None
        if stated_size is not None and tuple(stated_size) != (height, width):
            raise DatasetError(f"{where}: says the image is {stated_size[1]} x {stated_size[0]} (w x h) but {file} "
                               f"is {width} x {height}")
        image = {"id": len(self.images) + 1, "file_name": Path(relative).as_posix(), "height": height, "width": width}
        self.images.append(image)
        return image

    def add_instance(self, image: dict, category_id: int, where: str, polygons: list[list[float]] = (),
                     masks: list[np.ndarray] = ()) -> None:
        """Adds one instance: the union of flat polygons and bool[H, W] masks of the image's size.

        `where` names the instance in the source (file and shape) for the list of dropped instances.
        """
        height, width = image["height"], image["width"]
        rles = list(mask_utils.frPyObjects([list(p) for p in polygons], height, width)) if polygons else []
        rles += [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
        rle = mask_utils.merge(rles) if len(rles) > 1 else rles[0]
        area = float(mask_utils.area(rle))
        if area == 0:
            self.dropped.append(f"{where}: no pixel inside its {width} x {height} image")
            return
        if masks or not all(_inside(p, width, height) for p in polygons):
            segmentation: list | dict = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
        else:
            segmentation = [list(p) for p in polygons]
        self.annotations.append({"id": len(self.annotations) + 1, "image_id": image["id"],
                                 "category_id": category_id, "segmentation": segmentation, "area": area,
                                 "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": 0})

    def result(self) -> Conversion:
        coco = {"images": self.images, "annotations": self.annotations, "categories": self.categories}
        return Conversion(coco=coco, images_dir=self.images_dir, skipped=dict(self.skipped), dropped=self.dropped)


def _inside(polygon: list[float], width: int, height: int) -> bool:
    xs, ys = np.asarray(polygon[0::2]), np.asarray(polygon[1::2])
    tolerance = POLYGON_TOLERANCE_PX
    return bool(xs.min() >= -tolerance and ys.min() >= -tolerance and xs.max() <= width + tolerance
                and ys.max() <= height + tolerance)

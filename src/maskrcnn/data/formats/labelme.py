"""LabelMe (wkentaro/labelme): one json per image, beside it, with `imagePath` (relative to the json's folder),
`imageHeight` / `imageWidth` and `shapes`: each `label`, `points` [[x, y], ...], `shape_type`, `group_id`.

Regions: polygon (>= 3 points), rectangle (2 opposite corners), circle (centre, a point on the circle),
oriented_rectangle (4 corners) and mask (a base64 PNG of the patch whose top-left corner is the first point).
Shapes with the same label and the same non-null `group_id` form one instance, as in LabelMe's own exporters;
line, linestrip, point and points are no regions and are skipped (counted). Classes: `labels.txt` in the folder
when it exists (LabelMe's `--labels` file; `__ignore__` and `_background_` are no classes, shapes labelled
`__ignore__` are skipped), else every label of a region found, sorted.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from maskrcnn.data.common import DatasetError
from maskrcnn.data.formats.builder import (
    CocoBuilder, Conversion, ellipse_polygon, finite_numbers, rectangle_polygon,
)

NOT_REGIONS = ("line", "linestrip", "point", "points")
NOT_CLASSES = ("__ignore__", "_background_")
POINT_COUNTS = {"rectangle": (2,), "circle": (2,), "oriented_rectangle": (4,), "mask": (2,)}


def convert_labelme(folder: str | Path) -> Conversion:
    """The LabelMe jsons of `folder` (not its subfolders) as COCO; file_names are relative to `folder`.

    Raises:
        DatasetError: no json in the folder, or a json, shape or image that is malformed (file and shape named).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder (LabelMe: the folder of the per-image jsons)")
    files = sorted(folder.glob("*.json"))
    if not files:
        raise DatasetError(f"{folder}: no LabelMe .json file in this folder")
    records = [(file, _read_json(file)) for file in files]
    names = _class_names(folder, records)
    builder = CocoBuilder({i: name for i, name in enumerate(names, start=1)}, folder)
    ids = {name: i for i, name in enumerate(names, start=1)}
    for file, record in records:
        _add_file(builder, file, record, ids)
    return builder.result()


def _read_json(file: Path) -> dict:
    try:
        record = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(record, dict) or not isinstance(record.get("shapes"), list):
        raise DatasetError(f"{file}: not a LabelMe file (needs an object with a 'shapes' list)")
    if not isinstance(record.get("imagePath"), str) or not record["imagePath"]:
        raise DatasetError(f"{file}: 'imagePath' must be the image's file name")
    for index, shape in enumerate(record["shapes"]):
        if not isinstance(shape, dict) or not isinstance(shape.get("label"), str) or not shape["label"]:
            raise DatasetError(f"{file}: shape {index}: needs a non-empty string 'label'")
    return record


def _class_names(folder: Path, records: list[tuple[Path, dict]]) -> list[str]:
    """labels.txt's names in its order, else every label of the jsons sorted; checks that each label is known."""
    labels_file = folder / "labels.txt"
    found = {shape["label"] for _, record in records for shape in record["shapes"]
             if shape.get("shape_type") not in NOT_REGIONS} - set(NOT_CLASSES)
    if not labels_file.is_file():
        return sorted(found)
    names = [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
    names = [name for name in names if name not in NOT_CLASSES]
    for file, record in records:
        for index, shape in enumerate(record["shapes"]):
            if shape["label"] not in names and shape["label"] != "__ignore__":
                raise DatasetError(f"{file}: shape {index}: label {shape['label']!r} is not in {labels_file}")
    return names


def _add_file(builder: CocoBuilder, file: Path, record: dict, ids: dict[str, int]) -> None:
    """Adds the image of one json and its instances (shapes grouped by label and group_id)."""
    stated = (record.get("imageHeight"), record.get("imageWidth"))
    image_file = file.parent / record["imagePath"].replace("\\", "/")
    image = builder.add_image(image_file, file, stated if None not in stated else None)
    instances: dict[object, dict] = {}
    for index, shape in enumerate(record["shapes"]):
        shape_type = shape.get("shape_type") or "polygon"
        if shape_type in NOT_REGIONS or shape["label"] == "__ignore__":
            builder.skipped[shape_type if shape_type in NOT_REGIONS else "__ignore__"] += 1
            continue
        group = shape.get("group_id")
        if group is not None and (isinstance(group, bool) or not isinstance(group, int)):
            raise DatasetError(f"{file}: shape {index}: group_id must be an integer or null, got {group!r:.40}")
        key = (shape["label"], group) if group is not None else index
        instance = instances.setdefault(key, {"label": shape["label"], "shapes": [], "polygons": [], "masks": []})
        instance["shapes"].append(index)
        region = _region(shape, shape_type, image, f"{file}: shape {index}")
        instance["masks" if isinstance(region, np.ndarray) else "polygons"].append(region)
    for instance in instances.values():
        where = f"{file}: shape{'s' if len(instance['shapes']) > 1 else ''} " + ", ".join(map(str, instance["shapes"]))
        builder.add_instance(image, ids[instance["label"]], where, instance["polygons"], instance["masks"])


def _region(shape: dict, shape_type: str, image: dict, where: str) -> list[float] | np.ndarray:
    """A shape's region: a flat polygon, or bool[H, W] for a mask."""
    points = shape.get("points")
    flat = finite_numbers([v for p in points for v in p]) if isinstance(points, list) and all(
        isinstance(p, list) and len(p) == 2 for p in points) else None
    if flat is None:
        raise DatasetError(f"{where}: 'points' must be a list of [x, y] pairs of finite numbers")
    count = len(flat) // 2
    if shape_type == "polygon" and count < 3:
        raise DatasetError(f"{where}: a polygon needs at least 3 points, got {count}")
    if shape_type not in ("polygon", *POINT_COUNTS):
        raise DatasetError(f"{where}: unknown shape_type {shape_type!r} (polygon, rectangle, circle, "
                           f"oriented_rectangle, mask, or one of {', '.join(NOT_REGIONS)})")
    if shape_type != "polygon" and count not in POINT_COUNTS[shape_type]:
        raise DatasetError(f"{where}: a {shape_type} has {POINT_COUNTS[shape_type][0]} points, got {count}")
    if shape_type == "rectangle":
        return rectangle_polygon(*flat)
    if shape_type == "circle":
        radius = float(np.hypot(flat[2] - flat[0], flat[3] - flat[1]))
        return ellipse_polygon(flat[0], flat[1], radius, radius)
    if shape_type == "mask":
        return _paste_mask(shape.get("mask"), flat, image, where)
    return flat


def _paste_mask(encoded: object, corners: list[float], image: dict, where: str) -> np.ndarray:
    """bool[H, W]: the base64 PNG patch placed with its top-left pixel at the first point (rounded), clipped."""
    if not isinstance(encoded, str):
        raise DatasetError(f"{where}: a mask shape needs 'mask', its base64 PNG")
    try:
        with Image.open(io.BytesIO(base64.b64decode(encoded, validate=True))) as png:
            patch = np.asarray(png.convert("L")) > 0
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as error:
        raise DatasetError(f"{where}: 'mask' is not a base64 PNG ({error})") from None
    height, width = image["height"], image["width"]
    left, top = round(corners[0]), round(corners[1])
    full = np.zeros((height, width), dtype=bool)
    y0, y1 = max(top, 0), min(top + patch.shape[0], height)
    x0, x1 = max(left, 0), min(left + patch.shape[1], width)
    if y0 < y1 and x0 < x1:
        full[y0:y1, x0:x1] = patch[y0 - top:y1 - top, x0 - left:x1 - left]
    return full

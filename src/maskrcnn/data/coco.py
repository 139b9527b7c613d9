"""COCO-format instance segmentation: an images folder plus an `instances_*.json`.

Supported: polygons (several parts per object), RLE (compressed and uncompressed), `iscrowd` annotations (kept in
`coco` for evaluation, never in the training targets), images without annotations (kept unless `drop_empty`).
Category ids map to contiguous labels 1..K in sorted id order. Everything a later `__getitem__` relies on is checked
once at construction, so a bad json fails at start-up with the file and the id named, not hours into training.

Shape letters: N objects of one image, H/W image size.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
from collections.abc import Callable
from pathlib import Path, PurePath

import numpy as np
import pycocotools.mask as mask_utils
import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from maskrcnn.data.common import MAX_IMAGE_PIXELS, DatasetError, read_rgb, resolve_inside, warn_degenerate
from maskrcnn.fileio import atomic_write

DEFAULT_SUBSET_CLASSES: dict[str, dict] = {
    "vehicles": {"supercategories": ["vehicle"]},
    "people": {"names": ["person"]},
    "animals": {"supercategories": ["animal"]},
}


def _load_json(path: Path, required: tuple[str, ...] = ("images", "annotations", "categories")) -> dict:
    try:
        with open(path) as file:
            data = json.load(file)
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:  # the json module decodes nested arrays and objects recursively
        raise DatasetError(f"{path}: arrays or objects nested too deeply for an annotation file") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a folder, not an annotation file") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: the top level must be an object with images, annotations, categories")
    for key in required:
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing required key '{key}' (a list)")
    return data


def _require(record: object, keys: tuple[str, ...], what: str, path: Path) -> None:
    if not isinstance(record, dict):
        raise DatasetError(f"{path}: every entry of '{what}s' must be an object, got {record!r:.80}")
    missing = [key for key in keys if key not in record]
    if missing:
        raise DatasetError(f"{path}: {what} {record.get('id', '(no id)')} is missing required key(s) {missing}")


def _check_id(record: dict, key: str, what: str, path: Path) -> None:
    """Ids are JSON integers (COCO's format): a list, a string or a float id is an error naming the record."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int):
        where = f"a {what}'s id" if key == "id" else f"{what} {record['id']}: {key}"
        raise DatasetError(f"{path}: {where} must be an integer, got {value!r:.40}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_file_name(file_name: object, image_id: object, path: Path) -> None:
    """Rejects names that would read outside the images folder (absolute paths, '..')."""
    if not isinstance(file_name, str) or not file_name or "\0" in file_name:
        raise DatasetError(f"{path}: image {image_id}: file_name must be a non-empty string without NUL, got "
                           f"{file_name!r:.80}")
    parts = PurePath(file_name)
    if parts.is_absolute() or file_name.startswith(("/", "\\")) or ".." in parts.parts or ".." in file_name.split("\\"):
        raise DatasetError(f"{path}: image {image_id}: file_name {file_name!r} escapes the images folder")


def _check_image(image: dict, path: Path) -> None:
    """Integer id, safe file name, and a size whose masks fit in memory (decoding allocates height x width)."""
    _check_id(image, "id", "image", path)
    _check_file_name(image["file_name"], image["id"], path)
    height, width = image["height"], image["width"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (height, width)):
        raise DatasetError(f"{path}: image {image['id']}: height and width must be positive integers, got "
                           f"{height!r:.40} and {width!r:.40}")
    if height * width > MAX_IMAGE_PIXELS:
        raise DatasetError(f"{path}: image {image['id']}: {width} x {height} pixels is over the limit of "
                           f"{MAX_IMAGE_PIXELS} (maskrcnn.data.common.MAX_IMAGE_PIXELS)")


def _compressed_rle_counts(counts: str) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string (pycocotools' rleFrString, in Python), or None when the
    string is malformed. Needed to check a string before pycocotools decodes it: its decoder trusts the runs and
    writes past its buffer or leaves pixels uninitialised when they do not add up to height x width."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position == len(counts):
                return None  # the last run's continuation bit promised another character
            char = ord(counts[position]) - 48
            if not 0 <= char < 64:
                return None  # outside the alphabet '0'..'o' of the 6-bit groups
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            position += 1
            shift += 5
            if not more and char & 0x10:
                value -= 1 << shift  # sign extension of the last 5-bit group
        if len(runs) > 2:
            value += runs[-2]  # runs after the first two are stored as differences
        runs.append(value)
    return runs


def _check_rle(rle: dict, size: tuple[int, int], ann_id: object, path: Path) -> None:
    """`size` is the image's [h, w]; the runs (a list, or a compressed string) are non-negative and add up to h*w."""
    if "size" not in rle or "counts" not in rle:
        raise DatasetError(f"{path}: annotation {ann_id}: RLE segmentation needs 'size' and 'counts'")
    rle_size = rle["size"]
    if not isinstance(rle_size, list) or len(rle_size) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in rle_size):
        raise DatasetError(f"{path}: annotation {ann_id}: RLE size must be [height, width], got {rle_size!r:.40}")
    if tuple(rle_size) != tuple(size):
        raise DatasetError(f"{path}: annotation {ann_id}: RLE size {rle_size} differs from its image's (height, "
                           f"width) {list(size)}")
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
            raise DatasetError(f"{path}: annotation {ann_id}: RLE counts must be integers")
        runs = counts
    elif isinstance(counts, str):
        runs = _compressed_rle_counts(counts)
        if runs is None:
            raise DatasetError(f"{path}: annotation {ann_id}: RLE counts is not a valid compressed RLE string")
    else:
        raise DatasetError(f"{path}: annotation {ann_id}: RLE counts must be a list of run lengths or a compressed "
                           f"string, got {type(counts).__name__}")
    if any(run < 0 for run in runs):
        raise DatasetError(f"{path}: annotation {ann_id}: RLE counts has a negative run length")
    if sum(runs) != size[0] * size[1]:
        raise DatasetError(f"{path}: annotation {ann_id}: RLE runs add up to {sum(runs)} pixels, but its image has "
                           f"{size[0]} x {size[1]} = {size[0] * size[1]}")


def _check_segmentation(segmentation: object, size: tuple[int, int], ann_id: object, path: Path) -> None:
    """Polygons need >= 3 points of finite numbers near the image; an RLE must be consistent with its image (h, w).

    Polygon points may lie outside the image (COCO's do, by a fraction of a pixel), but at most one image size away
    from it: pycocotools rasterises every edge at 5x resolution, so a point at 1e8 would allocate gigabytes.
    """
    height, width = size
    if isinstance(segmentation, list):
        if not segmentation:
            raise DatasetError(f"{path}: annotation {ann_id}: segmentation has no polygon")
        for j, polygon in enumerate(segmentation):
            if not isinstance(polygon, list) or len(polygon) % 2 or len(polygon) < 6:
                count = len(polygon) if isinstance(polygon, list) else "no"
                raise DatasetError(f"{path}: annotation {ann_id}: polygon {j} has {count} coordinates; a polygon "
                                   f"needs at least 3 points as a flat list of x, y pairs")
            if not all(_is_number(v) for v in polygon):
                bad = next(v for v in polygon if not _is_number(v))
                raise DatasetError(f"{path}: annotation {ann_id}: polygon {j} has a coordinate {bad!r:.40} that is "
                                   f"not a finite number")
            xs, ys = np.asarray(polygon[0::2], dtype=np.float64), np.asarray(polygon[1::2], dtype=np.float64)
            if xs.min() < -width or xs.max() > 2 * width or ys.min() < -height or ys.max() > 2 * height:
                raise DatasetError(f"{path}: annotation {ann_id}: polygon {j} reaches x {xs.min():g}..{xs.max():g}, "
                                   f"y {ys.min():g}..{ys.max():g}, far outside its {width} x {height} image "
                                   f"(allowed: one image size beyond each border)")
    elif isinstance(segmentation, dict):
        _check_rle(segmentation, size, ann_id, path)
    else:
        raise DatasetError(f"{path}: annotation {ann_id}: segmentation must be a polygon list or an RLE object")


def _check_annotation(ann: dict, path: Path) -> None:
    """Integer ids, a 0/1 iscrowd (the strings "0" / "1" are read as the numbers), finite bbox and area."""
    _check_id(ann, "id", "annotation", path)
    for key in ("image_id", "category_id"):
        _check_id(ann, key, "annotation", path)
    crowd = ann.get("iscrowd", 0)
    if crowd in ("0", "1"):
        ann["iscrowd"] = crowd = int(crowd)
    if crowd not in (0, 1) or isinstance(crowd, float):
        raise DatasetError(f"{path}: annotation {ann['id']}: iscrowd must be 0 or 1, got {crowd!r:.40}")
    bbox = ann["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise DatasetError(f"{path}: annotation {ann['id']}: bbox must be [x, y, width, height] of finite numbers, "
                           f"got {bbox!r:.80}")
    if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
        raise DatasetError(f"{path}: annotation {ann['id']}: area must be a non-negative number, got "
                           f"{ann['area']!r:.40}")


def _to_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """One compressed RLE per object, whatever its encoding in the json."""
    if isinstance(segmentation, list):  # polygons: one object may have several parts
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def _categories(categories: list[dict], path: Path) -> tuple[dict[int, int], list[str]]:
    """The json's categories checked (at least one; id and name; ids unique), as labels 1..K in category-id order:
    ({label: category id}, [name of label 1, ..., name of label K])."""
    if not categories:
        raise DatasetError(f"{path}: 'categories' is empty; a data set needs at least one category")
    for category in categories:
        _require(category, ("id", "name"), "category", path)
        _check_id(category, "id", "category", path)
        if not isinstance(category["name"], str):
            raise DatasetError(f"{path}: category {category['id']}: name must be a string")
    category_ids = sorted(c["id"] for c in categories)
    duplicates = sorted(cid for cid, count in collections.Counter(category_ids).items() if count > 1)
    if duplicates:
        raise DatasetError(f"{path}: duplicate category id(s) {duplicates[:10]}")
    names = {c["id"]: c["name"] for c in categories}
    return dict(enumerate(category_ids, start=1)), [names[cid] for cid in category_ids]


class CocoDataset(Dataset):
    """A COCO-format instance segmentation data set.

    Args:
        images_dir: folder the images' `file_name`s are relative to.
        annotations: the instances json.
        drop_empty: drop images without a usable annotation (non-crowd, box at least 1 px wide and high).
        transform: optional paired transform applied to (image, target).
        coco_dict: the json's content, already in memory (another format converted to COCO); `annotations` then
            only names the source in messages.

    Attributes:
        coco: pycocotools `COCO` of the whole json (crowd annotations included, image ids as in the json).
        class_names: K category names, label k is class_names[k - 1].
        label_to_category_id / category_id_to_label: the contiguous-label maps.
        image_ids: json image id of every sample, in data set order.
    """

    def __init__(self, *, images_dir: str | Path, annotations: str | Path, drop_empty: bool = False,
                 transform: Callable[[Tensor, dict], tuple[Tensor, dict]] | None = None, coco_dict: dict | None = None):
        self.images_dir = Path(images_dir)
        self.annotations_path = path = Path(annotations)
        self.transform = transform
        data = _load_json(path) if coco_dict is None else coco_dict

        self.label_to_category_id, self.class_names = _categories(data["categories"], path)
        self.category_id_to_label = {cid: label for label, cid in self.label_to_category_id.items()}

        images = {}
        for image in data["images"]:
            _require(image, ("id", "file_name", "height", "width"), "image", path)
            _check_image(image, path)
            if image["id"] in images:
                raise DatasetError(f"{path}: duplicate image id {image['id']}")
            images[image["id"]] = image

        # Non-crowd annotations, gathered for one vectorised box conversion: M of them.
        owners, boxes_xywh, labels, segmentations = [], [], [], []
        annotation_ids: set[int] = set()
        for ann in data["annotations"]:
            _require(ann, ("id", "image_id", "category_id", "bbox", "segmentation"), "annotation", path)
            _check_annotation(ann, path)
            if ann["id"] in annotation_ids:  # pycocotools would keep only the last of them
                raise DatasetError(f"{path}: duplicate annotation id {ann['id']}")
            annotation_ids.add(ann["id"])
            image = images.get(ann["image_id"])
            if image is None:
                raise DatasetError(f"{path}: annotation {ann['id']} points to unknown image id {ann['image_id']}")
            if ann["category_id"] not in self.category_id_to_label:
                raise DatasetError(f"{path}: annotation {ann['id']} has unknown category id {ann['category_id']}")
            height, width = image["height"], image["width"]
            _check_segmentation(ann["segmentation"], (height, width), ann["id"], path)
            ann.setdefault("iscrowd", 0)  # COCOeval needs both fields
            if "area" not in ann:
                ann["area"] = float(mask_utils.area(_to_rle(ann["segmentation"], height, width)))
            if not ann["iscrowd"]:
                owners.append(image)
                boxes_xywh.append(ann["bbox"])
                labels.append(self.category_id_to_label[ann["category_id"]])
                segmentations.append(ann["segmentation"])

        xywh = np.array(boxes_xywh, dtype=np.float32).reshape(-1, 4)  # [M, 4]
        limits = np.array([[o["width"], o["height"]] for o in owners], dtype=np.float32).reshape(-1, 2)  # [M, 2]
        # xywh -> xyxy, clipped to the image: COCO boxes can overshoot the border by a fraction of a pixel.
        xyxy = np.concatenate([np.clip(xywh[:, :2], 0, limits), np.clip(xywh[:, :2] + xywh[:, 2:], 0, limits)], 1)
        usable = ((xyxy[:, 2:] - xyxy[:, :2]) >= 1).all(axis=1)  # [M]
        warn_degenerate(int((~usable).sum()), path)
        objects_per_image: dict[object, list[int]] = {image_id: [] for image_id in images}
        for m in np.flatnonzero(usable).tolist():
            objects_per_image[owners[m]["id"]].append(m)
        labels_array = np.array(labels, dtype=np.int64)

        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()

        self._records = []
        for image_id, image in images.items():
            rows = objects_per_image[image_id]
            if drop_empty and not rows:
                continue
            self._records.append((image, xyxy[rows], labels_array[rows], [segmentations[m] for m in rows]))
        if drop_empty and not self._records:
            crowd = len(data["annotations"]) - len(owners)
            raise DatasetError(f"{path}: no image is left to train on: none of its {len(images)} images has an "
                               f"annotation that is not a crowd region ({crowd} of them) with a box of at least "
                               f"1 x 1 pixel")
        self.image_ids = [record[0]["id"] for record in self._records]

    def __len__(self) -> int:
        return len(self._records)

    def image_size(self, index: int) -> tuple[int, int]:
        image = self._records[index][0]
        return image["height"], image["width"]

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image, boxes, labels, segmentations = self._records[index]
        height, width = image["height"], image["width"]
        file = resolve_inside(self.images_dir, image["file_name"], image["id"], self.annotations_path)
        pixels = read_rgb(file, image["id"])
        if tuple(pixels.shape[1:]) != (height, width):
            # read_rgb applies the EXIF rotation; a json written from the stored pixels then has h and w swapped
            hint = " (the file's EXIF orientation rotates it)" if tuple(pixels.shape[1:]) == (width, height) else ""
            raise DatasetError(f"{file}: image {image['id']} decodes to (h, w) {tuple(pixels.shape[1:])}{hint} but "
                               f"{self.annotations_path} says {(height, width)}")
        if segmentations:
            rles = [_to_rle(s, height, width) for s in segmentations]
            masks = torch.from_numpy(mask_utils.decode(rles)).permute(2, 0, 1).contiguous()  # (H, W, N) -> (N, H, W)
        else:
            masks = torch.zeros((0, height, width), dtype=torch.uint8)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "masks": masks,
            "image_id": image["id"],
        }
        if self.transform is not None:
            pixels, target = self.transform(pixels, target)
        return pixels, target


def read_coco_index(annotations: str | Path) -> tuple[list[dict], dict[str, object]]:
    """The classes and image ids of a COCO json, without reading any image.

    Returns:
        categories: [{"id", "name"}] in label order (sorted by id, as `CocoDataset` numbers them 1..K); empty when
            the json has none;
        image_ids: file_name -> image id.
    Raises:
        DatasetError: the json is missing, invalid, or a category / image lacks its id or name.
    """
    path = Path(annotations)
    data = _load_json(path, required=("images",))  # image-info jsons (e.g. COCO test-dev) have no annotations
    data.setdefault("categories", [])
    for category in data["categories"]:
        _require(category, ("id", "name"), "category", path)
    for image in data["images"]:
        _require(image, ("id", "file_name"), "image", path)
    categories = sorted(({"id": c["id"], "name": c["name"]} for c in data["categories"]), key=lambda c: c["id"])
    return categories, {image["file_name"]: image["id"] for image in data["images"]}


def build_coco_subset(instances_json: str | Path, out_json: str | Path, *,
                      classes: dict[str, dict] | None = None) -> dict:
    """Writes a COCO json whose categories are merged groups of an official one's, as the original project did
    (vehicles / people / animals).

    Only images with at least one kept annotation (crowd ones included) are written; images, annotations (with
    every field, `iscrowd` and `area` included) and their ids are otherwise copied unchanged. The file is written
    to a temporary name and renamed, so a crash never leaves half a json.

    Args:
        instances_json: an official `instances_*.json`.
        out_json: the file to write.
        classes: new class name -> {"supercategories": [...], "names": [...]} (either or both); new category ids
            are 1..len(classes) in this order. None: DEFAULT_SUBSET_CLASSES (vehicles = supercategory vehicle,
            people = category person, animals = supercategory animal).
    Returns:
        a summary: {"images": count, "annotations": count, "crowd_annotations": count,
        "annotations_per_class": {class name: count}}.
    Raises:
        DatasetError: bad input json, a class that matches no category, or a category matched by two classes.
    """
    instances_json = Path(instances_json)
    classes = DEFAULT_SUBSET_CLASSES if classes is None else classes
    data = _load_json(instances_json)
    for category in data["categories"]:
        _require(category, ("id", "name"), "category", instances_json)
        _check_id(category, "id", "category", instances_json)
    new_id_of: dict[object, int] = {}
    for new_id, (name, spec) in enumerate(classes.items(), start=1):
        unknown = set(spec) - {"supercategories", "names"}
        if unknown or not spec:
            raise DatasetError(f"class {name!r}: give 'supercategories' and/or 'names', got keys {sorted(spec)}")
        supercategories, names = spec.get("supercategories", ()), spec.get("names", ())
        matched = [c for c in data["categories"] if c.get("supercategory") in supercategories or c.get("name") in names]
        if not matched:
            raise DatasetError(f"{instances_json}: class {name!r} matches no category ({spec})")
        for category in matched:
            if category["id"] in new_id_of:
                raise DatasetError(f"{instances_json}: category {category['name']!r} is matched by two classes")
            new_id_of[category["id"]] = new_id

    annotations = []
    for ann in data["annotations"]:
        _require(ann, ("id", "image_id", "category_id"), "annotation", instances_json)
        for key in ("id", "image_id", "category_id"):
            _check_id(ann, key, "annotation", instances_json)
        if ann["category_id"] in new_id_of:
            annotations.append({**ann, "category_id": new_id_of[ann["category_id"]]})
    kept_images = {ann["image_id"] for ann in annotations}
    subset = {key: value for key, value in data.items() if key not in ("images", "annotations", "categories")}
    subset["images"] = [image for image in data["images"] if image.get("id") in kept_images]
    subset["annotations"] = annotations
    subset["categories"] = [{"id": i, "name": name, "supercategory": name}
                            for i, name in enumerate(classes, start=1)]

    with atomic_write(out_json, "w") as file:
        json.dump(subset, file)
    per_class = {name: 0 for name in classes}
    names = list(classes)
    for ann in annotations:
        per_class[names[ann["category_id"] - 1]] += 1
    return {"images": len(subset["images"]), "annotations": len(annotations),
            "crowd_annotations": sum(1 for ann in annotations if ann.get("iscrowd")),
            "annotations_per_class": per_class}

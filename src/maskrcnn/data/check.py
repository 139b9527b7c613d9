"""`maskrcnn data check`: what a COCO json and its images folder hold, and every problem in them, each named with
its image or annotation id, before hours of training find the first one.

Problems that `CocoDataset` refuses (at start-up or when it reads the image) would fail training: malformed or
duplicate records, unknown image or category ids, polygons with fewer than 3 points or far outside their image,
missing or unreadable image files, files whose size differs from the json's. The others train, but badly: empty
masks, zero-area polygons, polygons reaching outside their image, boxes under 1 px (dropped in training) and
boxes that disagree with their masks. One pass over the json (time linear in its size) plus one read per image.

Shape letters: M annotations.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils

from maskrcnn.data.coco import (
    _check_annotation, _check_id, _check_image, _check_segmentation, _load_json, _require, _to_rle,
)
from maskrcnn.data.common import DatasetError, read_rgb, read_size, resolve_inside
from maskrcnn.data.formats.builder import POLYGON_TOLERANCE_PX

BOX_IOU_THRESHOLD = 0.7  # a box whose IoU with its mask's box is lower disagrees with its mask
AREA_RANGES = {"small": (0, 32 ** 2), "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, float("inf"))}  # COCO's


@dataclass(frozen=True)
class Problem:
    """One thing wrong in the data."""

    kind: str  # missing_image, unreadable_image, size_mismatch, bad_record, duplicate_id, unknown_id, empty_mask,
    #            degenerate_polygon, polygon_outside_image, degenerate_box, box_mask_disagree
    message: str  # one line naming the image / annotation / category id
    fails_training: bool  # CocoDataset refuses it (at start-up or when it reads the image)
    image_id: object = None  # the image it concerns, when known (for a page marking the images)
    annotation_id: object = None  # the annotation it concerns, when it is one


@dataclass
class DataCheck:
    """What `check_dataset` found: counts for the whole json and every problem."""

    json_path: str  # the COCO json checked
    images_dir: str  # the folder its file_names are relative to
    images: int  # image records
    annotations: int  # annotation records
    categories: list[dict]  # [{"id", "name"}] sorted by id (training's label order)
    instances_per_class: dict[str, int]  # non-crowd annotations per category name
    sizes: dict[str, int]  # non-crowd annotations by COCO's area ranges: small < 32^2 <= medium < 96^2 <= large
    crowd_regions: int  # annotations with iscrowd 1
    empty_image_ids: list  # images without any non-crowd annotation
    box_iou_threshold: float  # box_mask_disagree: box-to-mask-box IoU under this
    problems: list[Problem] = field(default_factory=list)
    # What training would read, for a page of the ground truth (not in the JSON summary): image id -> its record
    # (well-formed, the first of a duplicated id), and the annotation records CocoDataset takes.
    checked_images: dict = field(default_factory=dict, repr=False)
    checked_annotations: list[dict] = field(default_factory=list, repr=False)

    @property
    def fails_training(self) -> bool:
        return any(problem.fails_training for problem in self.problems)

    def problems_by_image(self) -> dict[object, list[Problem]]:
        """Image id -> its problems (those of its annotations included), for a page of the ground truth."""
        grouped: dict[object, list[Problem]] = {}
        for problem in self.problems:
            if problem.image_id is not None:
                grouped.setdefault(problem.image_id, []).append(problem)
        return grouped

    def to_json(self) -> str:
        values = asdict(replace(self, checked_images={}, checked_annotations=[]))
        del values["checked_images"], values["checked_annotations"]
        values["fails_training"] = self.fails_training
        values["empty_images"] = len(self.empty_image_ids)
        return json.dumps(values, indent=2, default=str) + "\n"

    def lines(self) -> list[str]:
        """The summary and every problem, a line each, for the terminal."""
        per_class = ", ".join(f"{name} {count}" for name, count in self.instances_per_class.items())
        lines = [(f"{self.json_path}: {self.images} images, {sum(self.instances_per_class.values())} instances "
                  f"({per_class}), {self.crowd_regions} crowd regions, {len(self.empty_image_ids)} empty images"),
                 "sizes: " + ", ".join(f"{name} {count}" for name, count in self.sizes.items())]
        fatal = sum(problem.fails_training for problem in self.problems)
        lines += [f"{'ERROR' if p.fails_training else 'warning'} {p.kind}: {p.message}" for p in self.problems]
        lines.append(f"{len(self.problems)} problems, {fatal} of which would fail training" if self.problems
                     else "no problems")
        return lines


def check_dataset(json_path: str | Path, images_dir: str | Path, *, box_iou_threshold: float = BOX_IOU_THRESHOLD,
                  decode_images: bool = True) -> DataCheck:
    """Counts and problems of a COCO json and its images.

    Args:
        decode_images: decode every image (finds truncated files); False reads the headers only.
    Raises:
        DatasetError: the json itself cannot be read (missing, not JSON, no images / annotations / categories).
    """
    json_path, images_dir = Path(json_path), Path(images_dir)
    data = _load_json(json_path)
    problems: list[Problem] = []
    categories = _check_categories(data["categories"], json_path, problems)
    images = _check_images(data["images"], json_path, images_dir, problems, decode_images)
    result = DataCheck(json_path=str(json_path), images_dir=str(images_dir), images=len(data["images"]),
                       annotations=len(data["annotations"]), categories=categories,
                       instances_per_class={c["name"]: 0 for c in categories}, sizes=dict.fromkeys(AREA_RANGES, 0),
                       crowd_regions=0, empty_image_ids=[], box_iou_threshold=box_iou_threshold, problems=problems,
                       checked_images=images)
    _check_annotations(data["annotations"], images, {c["id"]: c["name"] for c in categories}, json_path, result)
    return result


def _fatal(problems: list[Problem], kind: str, error: DatasetError | str, **ids) -> None:
    problems.append(Problem(kind, str(error), True, **ids))


def _integer(record: object, key: str) -> int | None:
    """record[key] when it is an integer id (a problem names it), else None."""
    value = record.get(key) if isinstance(record, dict) else None
    return value if type(value) is int else None


def _check_categories(categories: list, path: Path, problems: list[Problem]) -> list[dict]:
    kept: dict[int, dict] = {}
    for category in categories:
        try:
            _require(category, ("id", "name"), "category", path)
            _check_id(category, "id", "category", path)
            if not isinstance(category["name"], str):
                raise DatasetError(f"{path}: category {category['id']}: name must be a string")
        except DatasetError as error:
            _fatal(problems, "bad_record", error)
            continue
        if category["id"] in kept:
            _fatal(problems, "duplicate_id", f"{path}: duplicate category id {category['id']}")
            continue
        kept[category["id"]] = {"id": category["id"], "name": category["name"]}
    if not categories:
        _fatal(problems, "bad_record", f"{path}: 'categories' is empty; a data set needs at least one category")
    return sorted(kept.values(), key=lambda c: c["id"])


def _check_images(records: list, path: Path, folder: Path, problems: list[Problem], decode: bool) -> dict:
    """Image id -> record of the well-formed images; problems of the records and their files."""
    images: dict[object, dict] = {}
    for image in records:
        try:
            _require(image, ("id", "file_name", "height", "width"), "image", path)
            _check_image(image, path)
        except DatasetError as error:
            _fatal(problems, "bad_record", error, image_id=_integer(image, "id"))
            continue
        image_id = image["id"]
        if image_id in images:
            _fatal(problems, "duplicate_id", f"{path}: duplicate image id {image_id}", image_id=image_id)
            continue
        images[image_id] = image
        _check_file(image, path, folder, problems, decode)
    return images


def _check_file(image: dict, path: Path, folder: Path, problems: list[Problem], decode: bool) -> None:
    image_id = image["id"]
    try:
        file = resolve_inside(folder, image["file_name"], image_id, path)
    except DatasetError as error:
        return _fatal(problems, "bad_record", error, image_id=image_id)
    if not file.is_file():
        return _fatal(problems, "missing_image", f"image {image_id}: {folder / image['file_name']} not found",
                      image_id=image_id)
    try:
        size = tuple(read_rgb(file, image_id).shape[1:]) if decode else read_size(file, image_id)
    except DatasetError as error:
        return _fatal(problems, "unreadable_image", f"image {image_id}: {error}", image_id=image_id)
    if size != (image["height"], image["width"]):
        _fatal(problems, "size_mismatch", f"image {image_id}: {file} is {size[1]} x {size[0]} (w x h) but the json "
                                          f"says {image['width']} x {image['height']}", image_id=image_id)


def _check_annotations(records: list, images: dict, names: dict, path: Path, result: DataCheck) -> None:
    """Checks every annotation and fills the counts of `result`; box-mask IoUs are computed at the end at once."""
    seen: set = set()
    with_instances: set = set()
    boxes, mask_boxes, owners = [], [], []  # per checked non-crowd annotation: xywh, xywh of its mask, (image, ann)
    for ann in records:
        ann_id = _integer(ann, "id")
        ids = {"annotation_id": ann_id, "image_id": _integer(ann, "image_id")}
        fault = _record_fault(ann, images, names, seen, path)
        if fault is not None:
            _fatal(result.problems, *fault, **ids)
            continue
        result.checked_annotations.append(ann)
        image = images[ann["image_id"]]
        if ann.get("iscrowd"):
            result.crowd_regions += 1
            continue
        area = _geometry(ann, image, path, result.problems, boxes, mask_boxes)
        owners.append((image["id"], ann_id))
        result.instances_per_class[names[ann["category_id"]]] += 1
        stated_area = ann.get("area", area)
        result.sizes[next(k for k, (low, high) in AREA_RANGES.items() if low <= stated_area < high)] += 1
        if ann["bbox"][2] >= 1 and ann["bbox"][3] >= 1 and area > 0:
            with_instances.add(image["id"])
    _box_agreement(np.array(boxes).reshape(-1, 4), np.array(mask_boxes).reshape(-1, 2, 4), owners, path, result)
    result.empty_image_ids = [image_id for image_id in images if image_id not in with_instances]


def _record_fault(ann: object, images: dict, names: dict, seen: set, path: Path) -> tuple[str, str] | None:
    """(kind, message) of what makes CocoDataset refuse an annotation record, or None; adds its id to `seen`."""
    try:
        _require(ann, ("id", "image_id", "category_id", "bbox", "segmentation"), "annotation", path)
        _check_annotation(ann, path)
    except DatasetError as error:
        return "bad_record", str(error)
    if ann["id"] in seen:  # pycocotools would keep only the last of them
        return "duplicate_id", f"{path}: duplicate annotation id {ann['id']}"
    seen.add(ann["id"])
    image = images.get(ann["image_id"])
    if image is None:
        return "unknown_id", f"{path}: annotation {ann['id']} points to unknown image id {ann['image_id']}"
    if ann["category_id"] not in names:
        return "unknown_id", f"{path}: annotation {ann['id']} has unknown category id {ann['category_id']}"
    try:
        _check_segmentation(ann["segmentation"], (image["height"], image["width"]), ann["id"], path)
    except DatasetError as error:
        return "bad_record", str(error)
    return None


def _geometry(ann: dict, image: dict, path: Path, problems: list[Problem], boxes: list, mask_boxes: list) -> float:
    """The mask's area; problems of polygons and box (none fails training); the box and its mask's boxes kept."""
    ids = {"image_id": image["id"], "annotation_id": ann["id"]}
    height, width = image["height"], image["width"]
    segmentation = ann["segmentation"]
    rle = _to_rle(segmentation, height, width)
    area = float(mask_utils.area(rle))
    raster_box = mask_utils.toBbox(rle).tolist()
    extent_box = raster_box
    if isinstance(segmentation, list):
        points = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in segmentation])  # [P, 2]
        low = np.clip(points.min(axis=0), 0, [width, height])
        high = np.clip(points.max(axis=0), 0, [width, height])
        extent_box = [*low.tolist(), *(high - low).tolist()]
        for j, polygon in enumerate(segmentation):
            xs, ys = np.asarray(polygon[0::2], np.float64), np.asarray(polygon[1::2], np.float64)
            if abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))) == 0:  # shoelace: twice the area
                problems.append(Problem("degenerate_polygon", f"{path}: annotation {ann['id']}: polygon {j} has zero "
                                                              f"area (its points lie on a line)", False, **ids))
            tolerance = POLYGON_TOLERANCE_PX
            if xs.min() < -tolerance or ys.min() < -tolerance or xs.max() > width + tolerance or \
                    ys.max() > height + tolerance:
                problems.append(Problem("polygon_outside_image", f"{path}: annotation {ann['id']}: polygon {j} "
                                        f"reaches x {xs.min():g}..{xs.max():g}, y {ys.min():g}..{ys.max():g}, outside "
                                        f"its {width} x {height} image", False, **ids))
    if area == 0:
        problems.append(Problem("empty_mask", f"{path}: annotation {ann['id']}: its mask has no pixel inside its "
                                              f"{width} x {height} image", False, **ids))
    elif ann["bbox"][2] < 1 or ann["bbox"][3] < 1:
        problems.append(Problem("degenerate_box", f"{path}: annotation {ann['id']}: bbox {ann['bbox']} is under "
                                                  f"1 px wide or high (training drops it)", False, **ids))
    else:
        boxes.append(ann["bbox"])
        mask_boxes.append([raster_box, extent_box])
        return area
    boxes.append([0, 0, 0, 0])
    mask_boxes.append([[0, 0, 0, 0]] * 2)  # kept aligned with the owners; skipped by _box_agreement
    return area


def _box_agreement(boxes: np.ndarray, mask_boxes: np.ndarray, owners: list, path: Path, result: DataCheck) -> None:
    """box_mask_disagree for every annotation whose box's IoU with both its mask's raster box and its polygons'
    extent is under the threshold. boxes: f64[M, 4] xywh (zeros: not compared); mask_boxes: f64[M, 2, 4] xywh."""
    if not len(boxes):
        return
    a = boxes[:, None, :]  # [M, 1, 4]
    widths = np.minimum(a[..., 0] + a[..., 2], mask_boxes[..., 0] + mask_boxes[..., 2]) - np.maximum(
        a[..., 0], mask_boxes[..., 0])
    heights = np.minimum(a[..., 1] + a[..., 3], mask_boxes[..., 1] + mask_boxes[..., 3]) - np.maximum(
        a[..., 1], mask_boxes[..., 1])
    inter = np.clip(widths, 0, None) * np.clip(heights, 0, None)  # [M, 2]
    union = a[..., 2] * a[..., 3] + mask_boxes[..., 2] * mask_boxes[..., 3] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 1.0).max(axis=1)  # [M]
    compared = boxes[:, 2] > 0
    for m in np.flatnonzero(compared & (iou < result.box_iou_threshold)).tolist():
        image_id, ann_id = owners[m]
        box = [round(v, 2) for v in mask_boxes[m, 0].tolist()]
        result.problems.append(Problem("box_mask_disagree", f"{path}: annotation {ann_id}: bbox "
                                       f"{boxes[m].tolist()} has IoU {iou[m]:.2f} with its mask's box {box} "
                                       f"(under {result.box_iou_threshold})", False, image_id=image_id,
                                       annotation_id=ann_id))

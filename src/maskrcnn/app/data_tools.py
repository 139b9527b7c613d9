"""`maskrcnn data convert`, `data check` and `data split`: annotations of the labelling tools turned into COCO, a
COCO json checked against its images (with a page of its ground truth to browse), and a json split into training
and validation. Each writes its files atomically (a failure leaves what was there) and returns what to print; the
command line prints it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pycocotools.mask as mask_utils
from torch import Tensor
from torchvision.transforms.functional import resize

from maskrcnn.data.check import BOX_IOU_THRESHOLD, DataCheck, Problem, check_dataset
from maskrcnn.data.common import DatasetError, read_rgb, resolve_inside
from maskrcnn.data.formats import convert_source
from maskrcnn.data.split import split_dataset
from maskrcnn.engine.coco_results import counts_str, xyxy
from maskrcnn.engine.views import ImageView
from maskrcnn.fileio import atomic_write, write_text_atomic
from maskrcnn.viz.browse import truth_picture, write_truth_page

PAGE_LIMIT = 300  # images pictured on the ground-truth page at most (those with problems first)
UNREADABLE = ("missing_image", "unreadable_image")  # problems of images the page lists instead of drawing


@dataclass
class ConvertSummary:
    """What `convert` wrote."""

    out: Path  # the COCO json
    images_dir: Path  # the folder its file_names are relative to
    images: int
    instances_per_class: dict[str, int]  # instances per class name (every class of the source, unused ones too)
    skipped: dict[str, int]  # shapes that are no regions, by type
    dropped: list[str]  # instances without a pixel inside their image, each named

    def lines(self) -> list[str]:
        per_class = ", ".join(f"{name} {count}" for name, count in self.instances_per_class.items())
        lines = [(f"wrote {self.out}: {self.images} images, {sum(self.instances_per_class.values())} instances "
                  f"({per_class})"),
                 (f"images folder: {self.images_dir} (give it to `maskrcnn data check {self.out} --images` and as "
                  f"data.train_images / data.val_images)")]
        if self.skipped:
            lines.append("skipped (no regions): " + ", ".join(f"{count} {kind}" for kind, count in self.skipped.items()))
        lines += [f"dropped {where}" for where in self.dropped]
        return lines


def convert(source_format: str, src: str | Path, out: str | Path, *, split: str | None = None,
            images_dir: str | Path | None = None) -> ConvertSummary:
    """Converts annotations of `source_format` (labelme, yolo-seg, voc, cvat) at `src` to the COCO json `out`.

    Raises:
        DatasetError: bad source data (file and entry named); nothing is written.
    """
    conversion = convert_source(source_format, src, split=split, images_dir=images_dir)
    with atomic_write(out, "w") as file:
        json.dump(conversion.coco, file)
    names = {c["id"]: c["name"] for c in conversion.coco["categories"]}
    per_class = dict.fromkeys(names.values(), 0)
    for ann in conversion.coco["annotations"]:
        per_class[names[ann["category_id"]]] += 1
    return ConvertSummary(out=Path(out), images_dir=conversion.images_dir, images=len(conversion.coco["images"]),
                          instances_per_class=per_class, skipped=conversion.skipped, dropped=conversion.dropped)


def check(json_path: str | Path, images_dir: str | Path, out_json: str | Path | None = None, *,
          box_iou_threshold: float = BOX_IOU_THRESHOLD, decode_images: bool = True) -> DataCheck:
    """Checks a COCO json against its images; writes the summary to `out_json` when given. The caller decides the
    exit status (`DataCheck.fails_training`)."""
    result = check_dataset(json_path, images_dir, box_iou_threshold=box_iou_threshold, decode_images=decode_images)
    if out_json is not None:
        write_text_atomic(out_json, result.to_json())
    return result


def ground_truth_page(result: DataCheck, path: str | Path, *, limit: int = PAGE_LIMIT) -> str:
    """Writes one self-contained page of the checked set's ground truth (`viz.browse.write_truth_page`): at most
    `limit` images, those with problems first, then the others in the json's order; each with the objects training
    would read, its problems (each naming its id) under it. Images that cannot be read are listed, not drawn.
    Returns the line to print."""
    by_image = result.problems_by_image()
    not_drawn = [{"id": p.image_id, "message": p.message} for p in result.problems if p.kind in UNREADABLE]
    unreadable = {entry["id"] for entry in not_drawn}
    chosen = _page_images([i for i in result.checked_images if i not in unreadable], by_image, limit)
    annotations: dict[object, list[dict]] = {image_id: [] for image_id in chosen}
    for ann in result.checked_annotations:
        if ann["image_id"] in annotations:
            annotations[ann["image_id"]].append(ann)
    labels = {category["id"]: k for k, category in enumerate(result.categories, start=1)}
    pictures = []
    for image_id in chosen:
        record, problems = result.checked_images[image_id], by_image.get(image_id, [])
        try:
            pixels = _read_as_json_says(record, Path(result.images_dir), result.json_path)
        except DatasetError as error:  # e.g. a truncated file that --headers-only did not decode
            not_drawn.append({"id": image_id, "message": str(error)})
            continue
        objects = [_page_object(ann, record, labels, problems) for ann in annotations[image_id]]
        pictures.append(truth_picture(ImageView(image_id=image_id, image=pixels, objects=objects, detections=[]),
                                      [{"kind": p.kind, "message": p.message, "annotationId": p.annotation_id}
                                       for p in problems]))
    listed = sum(len(picture["problems"]) for picture in pictures) + sum(p.kind in UNREADABLE for p in result.problems)
    elsewhere = len(result.problems) - listed
    note = (f"{len(pictures)} of {result.images} images pictured (at most {limit}: those with problems first, then "
            f"in the json's order), {len(not_drawn)} not drawn; {len(result.problems)} problems"
            + (f", {elsewhere} of them on no pictured image (see the check's summary)" if elsewhere else ""))
    write_truth_page(path, pictures, class_names=[c["name"] for c in result.categories],
                     title=f"ground truth of {Path(result.json_path).name}", note=note, not_drawn=not_drawn)
    return f"wrote {path}: {note}"


def _page_images(drawable: list, by_image: dict, limit: int) -> list:
    """Up to `limit` of the drawable image ids, those with problems first, in the json's order."""
    flagged = [image_id for image_id in drawable if image_id in by_image][:limit]
    others = [image_id for image_id in drawable if image_id not in by_image][:limit - len(flagged)]
    chosen = set(flagged) | set(others)
    return [image_id for image_id in drawable if image_id in chosen]


def _read_as_json_says(record: dict, images_dir: Path, json_path: str) -> Tensor:
    """uint8 [3, height, width] of an image record, resized to the json's size where the file differs (the check
    names that problem; the json's masks and boxes are drawn where the json puts them)."""
    pixels = read_rgb(resolve_inside(images_dir, record["file_name"], record["id"], json_path), record["id"])
    if tuple(pixels.shape[1:]) != (record["height"], record["width"]):
        pixels = resize(pixels, [record["height"], record["width"]], antialias=True)
    return pixels


def _page_object(ann: dict, image: dict, labels: dict, problems: list[Problem]) -> dict:
    """One checked annotation as the page draws it (`viz.browse.truth_picture`'s objects)."""
    segmentation, height, width = ann["segmentation"], image["height"], image["width"]
    if isinstance(segmentation, list):  # polygons: one object may have several parts
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return {"box": xyxy(ann["bbox"]), "label": labels[ann["category_id"]], "id": ann["id"],
            "mask": {"size": list(rle["size"]), "counts": counts_str(rle["counts"])},
            "crowd": bool(ann.get("iscrowd")), "problems": [p.kind for p in problems if p.annotation_id == ann["id"]]}


def split(json_path: str | Path, val: float, seed: int, out_dir: str | Path) -> list[str]:
    """Writes out_dir/train.json and out_dir/val.json, `val` of the images (by image, seeded) in the second;
    returns the lines to print."""
    train, validation = split_dataset(json_path, val, seed)
    lines = []
    for name, part in (("train", train), ("val", validation)):
        path = Path(out_dir) / f"{name}.json"
        with atomic_write(path, "w") as file:
            json.dump(part, file)
        lines.append(f"wrote {path}: {len(part['images'])} images, {len(part['annotations'])} annotations")
    return lines

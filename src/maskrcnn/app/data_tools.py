"""`maskrcnn data convert`, `data check` and `data split`: annotations of the labelling tools turned into COCO, a
COCO json checked against its images, and a json split into training and validation. Each writes its files
atomically (a failure leaves what was there) and returns what to print; the command line prints it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from maskrcnn.data.check import BOX_IOU_THRESHOLD, DataCheck, check_dataset
from maskrcnn.data.formats import convert_source
from maskrcnn.data.split import split_dataset
from maskrcnn.fileio import atomic_write, write_text_atomic


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

"""`maskrcnn data split`: a COCO json divided into training and validation jsons by image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from maskrcnn.data.coco import _load_json
from maskrcnn.data.common import DatasetError


def split_dataset(json_path: str | Path, val_fraction: float, seed: int) -> tuple[dict, dict]:
    """(train, val) COCO dicts: round(val_fraction x images) images (at least 1, at most all but 1) go to val.

    The images are ordered by id and permuted by numpy's generator seeded with `seed`, so a seed gives the same
    split whatever the order of the json's records. Every annotation goes with its image (an annotation of an
    unknown image goes nowhere); categories and the json's other keys (info, licenses) are copied to both.

    Raises:
        DatasetError: the json cannot be read, has fewer than 2 images, an image without an integer id, or
            val_fraction is not in (0, 1).
    """
    json_path = Path(json_path)
    if not 0 < val_fraction < 1:
        raise DatasetError(f"--val must be a fraction in (0, 1), got {val_fraction}")
    data = _load_json(json_path)
    images = data["images"]
    if not all(isinstance(image, dict) and type(image.get("id")) is int for image in images):
        raise DatasetError(f"{json_path}: every image needs an integer id (`maskrcnn data check` lists the problems)")
    if len(images) < 2:
        raise DatasetError(f"{json_path}: {len(images)} image(s); a split needs at least 2")
    order = sorted(range(len(images)), key=lambda i: images[i]["id"])
    shuffled = np.random.default_rng(seed).permutation(len(order))
    num_val = min(max(round(val_fraction * len(images)), 1), len(images) - 1)
    val_ids = {images[order[i]]["id"] for i in shuffled[:num_val].tolist()}
    rest = {key: value for key, value in data.items() if key not in ("images", "annotations")}
    parts = []
    for in_val in (False, True):
        chosen = [image for image in images if (image["id"] in val_ids) == in_val]
        ids = {image["id"] for image in chosen}
        annotations = [ann for ann in data["annotations"] if isinstance(ann, dict) and _hashable(ann.get("image_id"))
                       and ann["image_id"] in ids]
        parts.append({**rest, "images": chosen, "annotations": annotations})
    return parts[0], parts[1]


def _hashable(value: object) -> bool:
    return not isinstance(value, (list, dict))

"""Helpers that write small data sets in the real formats (imported by the data tests and conftest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

# Image 2's uncompressed RLE (16 x 16, column-major runs): 18 zeros, 3 ones (column 1, rows 2..4), 13 zeros,
# 3 ones (column 2, rows 2..4), then zeros to 256.
UNCOMPRESSED_COUNTS = [18, 3, 13, 3, 219]


def rle_block_mask() -> np.ndarray:
    """u8[20, 30]: the mask stored as a compressed RLE on image 1 (rows 10..14, columns 20..27)."""
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[10:15, 20:28] = 1
    return mask


def write_image(path: Path, height: int, width: int, mode: str = "RGB", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    Image.fromarray(array[..., 0] if mode == "L" else array, mode).save(path)
    return array


def coco_dict() -> dict:
    """Three images: 1 (20x30 RGB) with a two-part polygon, a compressed RLE and a crowd RLE; 2 (16x16 grayscale)
    with an uncompressed RLE and a degenerate box; 3 (10x12 RGBA) without annotations."""
    compressed = mask_utils.encode(np.asfortranarray(rle_block_mask()))
    compressed["counts"] = compressed["counts"].decode("ascii")
    crowd = mask_utils.encode(np.asfortranarray(np.pad(np.ones((3, 3), np.uint8), ((15, 2), (0, 27)))))
    crowd["counts"] = crowd["counts"].decode("ascii")
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 20, "width": 30},
            {"id": 2, "file_name": "sub/b.png", "height": 16, "width": 16},
            {"id": 7, "file_name": "c.png", "height": 10, "width": 12},
        ],
        "categories": [
            {"id": 9, "name": "nine", "supercategory": "x"},
            {"id": 3, "name": "three", "supercategory": "x"},
            {"id": 5, "name": "five", "supercategory": "y"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 5, "iscrowd": 0, "bbox": [2, 2, 14, 6],
             "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8], [12, 3, 16, 3, 16, 6, 12, 6]]},
            {"id": 11, "image_id": 1, "category_id": 3, "iscrowd": 0, "bbox": [20, 10, 8, 5],
             "segmentation": compressed},
            {"id": 12, "image_id": 1, "category_id": 9, "iscrowd": 1, "bbox": [0, 15, 3, 3],
             "segmentation": crowd},
            {"id": 20, "image_id": 2, "category_id": 9, "bbox": [1, 2, 2, 3],
             "segmentation": {"size": [16, 16], "counts": UNCOMPRESSED_COUNTS}},
            {"id": 21, "image_id": 2, "category_id": 3, "bbox": [5, 5, 0.5, 4],
             "segmentation": [[5, 5, 5.5, 5, 5.5, 9]]},
        ],
    }



def write_pennfudan(root: Path, masks: list[np.ndarray]) -> None:
    """A Penn-Fudan folder with one image per instance-id mask (PNG, mode L), images FudanPed0000<i>.png."""
    (root / "PNGImages").mkdir(parents=True)
    (root / "PedMasks").mkdir()
    for i, ids in enumerate(masks, start=1):
        write_image(root / "PNGImages" / f"FudanPed{i:05d}.png", *ids.shape, "RGB", seed=i)
        Image.fromarray(ids.astype(np.uint8), "L").save(root / "PedMasks" / f"FudanPed{i:05d}_mask.png")


def pennfudan_masks() -> list[np.ndarray]:
    """Three tiny instance-id maps: 2 people, 1 person, 0 people."""
    first = np.zeros((8, 10), np.uint8)
    first[1:4, 2:5] = 1  # box x 2..5, y 1..4
    first[5:8, 6:10] = 2  # box x 6..10, y 5..8
    second = np.zeros((6, 7), np.uint8)
    second[0:6, 3] = 1  # a one-pixel-wide column: box x 3..4, y 0..6
    return [first, second, np.zeros((5, 5), np.uint8)]

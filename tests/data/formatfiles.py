"""Writers of small data sets in the labelling tools' formats (LabelMe, YOLO segmentation, Pascal VOC, CVAT for
images), each following its format's specification, with the instance masks they stand for rasterised here
independently of the converters: a pixel belongs to a polygon when its centre lies inside (matplotlib's
point-in-polygon test), to a circle when its centre lies within the radius.

Every writer returns the expected instances, in the order the converter adds them: a list of
(image file_name, class name, bool[H, W] mask).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import yaml
from matplotlib.path import Path as MplPath
from PIL import Image

H, W = 72, 96  # every sample image's size


def polygon_mask(flat: list[float], height: int = H, width: int = W) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    centres = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1)
    return MplPath(np.asarray(flat, dtype=float).reshape(-1, 2)).contains_points(centres).reshape(height, width)


def disk_mask(cx: float, cy: float, radius: float, height: int = H, width: int = W) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return (xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2 <= radius ** 2


def box_mask(x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    return polygon_mask([x1, y1, x2, y1, x2, y2, x1, y2])


def write_photo(path: Path, height: int = H, width: int = W, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


PENTAGON = [10.5, 8.0, 50.0, 6.5, 58.0, 40.0, 30.0, 62.0, 6.0, 44.0]
TRIANGLE = [48.0, 6.0, 94.0, 10.0, 72.0, 66.0]
PART_A = [4.0, 4.0, 30.0, 4.0, 30.0, 30.0, 4.0, 30.0]
PART_B = [50.0, 40.0, 90.0, 40.0, 70.0, 68.0]


def patch_mask() -> np.ndarray:
    """bool[20, 24]: a ring-shaped patch (a hole in the middle), for the mask shapes of LabelMe and CVAT."""
    patch = np.zeros((20, 24), dtype=bool)
    patch[2:18, 3:21] = True
    patch[7:13, 9:15] = False
    return patch


def placed(patch: np.ndarray, left: int, top: int) -> np.ndarray:
    full = np.zeros((H, W), dtype=bool)
    full[top:top + patch.shape[0], left:left + patch.shape[1]] = patch
    return full


def _png_base64(mask: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def labelme_shape(label: str, points: list, shape_type: str = "polygon", group_id: int | None = None, **extra) -> dict:
    return {"label": label, "points": points, "group_id": group_id, "description": "", "shape_type": shape_type,
            "flags": {}, "mask": None, **extra}


def pairs(flat: list[float]) -> list[list[float]]:
    return [[flat[i], flat[i + 1]] for i in range(0, len(flat), 2)]


def labelme_file(image: str, shapes: list[dict], height: int = H, width: int = W) -> dict:
    return {"version": "5.5.0", "flags": {}, "shapes": shapes, "imagePath": image, "imageData": None,
            "imageHeight": height, "imageWidth": width}


def write_labelme(folder: Path) -> list[tuple[str, str, np.ndarray]]:
    """a.png: a polygon cat, a rectangle dog, a circle cat, a dog of two polygons (group 1), a line (skipped), a
    mask cat; b.png: a polygon dog; c.png: no shapes."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(("a.png", "b.png", "c.png")):
        write_photo(folder / name, seed=seed)
    patch = patch_mask()
    shapes_a = [
        labelme_shape("cat", pairs(PENTAGON)),
        labelme_shape("dog", [[88.0, 70.0], [62.0, 50.0]], "rectangle"),
        labelme_shape("cat", [[75.0, 25.0], [75.0, 40.0]], "circle"),
        labelme_shape("dog", pairs(PART_A), group_id=1),
        labelme_shape("person", [[1.0, 1.0], [20.0, 20.0]], "line"),
        labelme_shape("dog", pairs(PART_B), group_id=1),
        labelme_shape("cat", [[40.0, 30.0], [63.0, 49.0]], "mask", mask=_png_base64(patch)),
    ]
    files = {"a.json": labelme_file("a.png", shapes_a), "b.json": labelme_file("b.png", [
        labelme_shape("dog", pairs(TRIANGLE))]), "c.json": labelme_file("c.png", [])}
    for name, record in files.items():
        (folder / name).write_text(json.dumps(record))
    return [("a.png", "cat", polygon_mask(PENTAGON)), ("a.png", "dog", box_mask(62.0, 50.0, 88.0, 70.0)),
            ("a.png", "cat", disk_mask(75.0, 25.0, 15.0)), ("a.png", "dog", polygon_mask(PART_A) | polygon_mask(PART_B)),
            ("a.png", "cat", placed(patch, 40, 30)), ("b.png", "dog", polygon_mask(TRIANGLE))]


def write_yolo_seg(root: Path, names: object = None) -> list[tuple[str, str, np.ndarray]]:
    """data.yaml (path ., train/val folders, names {0: cat, 1: dog}); train: x.png with a pentagon cat, a box dog
    (the detection line) and a triangle dog, y.png without a label file; val: z.png with a cat."""
    for seed, name in enumerate(("images/train/x.png", "images/train/y.png", "images/val/z.png")):
        write_photo(root / name, seed=seed)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)

    def line(index: int, flat: list[float]) -> str:
        return " ".join([str(index)] + [f"{v / (W if i % 2 == 0 else H):.6f}" for i, v in enumerate(flat)])

    box = f"1 {76 / W:.6f} {60 / H:.6f} {24 / W:.6f} {16 / H:.6f}"  # cx cy w h of x 64..88, y 52..68
    (root / "labels/train/x.txt").write_text("\n".join([line(0, PENTAGON), box, line(1, TRIANGLE)]) + "\n")
    (root / "labels/val/z.txt").write_text(line(0, PART_A) + "\n")
    data = {"path": ".", "train": "images/train", "val": "images/val",
            "names": {0: "cat", 1: "dog"} if names is None else names}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return [("images/train/x.png", "cat", polygon_mask(PENTAGON)), ("images/train/x.png", "dog",
            box_mask(64, 52, 88, 68)), ("images/train/x.png", "dog", polygon_mask(TRIANGLE))]


def voc_palette() -> list[int]:
    """VOC's colour map as a flat PIL palette (index i's colour from the bits of i)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        for shift in range(8):
            r |= ((index >> (3 * shift)) & 1) << (7 - shift)
            g |= ((index >> (3 * shift + 1)) & 1) << (7 - shift)
            b |= ((index >> (3 * shift + 2)) & 1) << (7 - shift)
        palette += [r, g, b]
    return palette


def write_voc(root: Path, rgb: bool = False) -> list[tuple[str, str, np.ndarray]]:
    """2007_000001: a cat (object 1, class 8) ringed by the 255 void border, a dog (object 2, class 12);
    2007_000002: a person (15); ImageSets/Segmentation/train.txt lists the first, val.txt the second.
    `rgb`: the label PNGs as colour images of VOC's colour map instead of palette images."""
    for sub in ("JPEGImages", "SegmentationObject", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    cat, dog = polygon_mask(PENTAGON), box_mask(62, 50, 90, 70)
    border = polygon_mask([9.0, 6.0, 52.0, 4.5, 60.0, 41.0, 30.0, 64.0, 4.0, 45.0]) & ~cat
    person = polygon_mask(TRIANGLE)
    for image_id, objects in (("2007_000001", [(cat, 8), (dog, 12)]), ("2007_000002", [(person, 15)])):
        write_photo(root / "JPEGImages" / f"{image_id}.jpg")
        instance_ids, class_ids = np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8)
        for number, (mask, class_index) in enumerate(objects, start=1):
            instance_ids[mask], class_ids[mask] = number, class_index
        if image_id == "2007_000001":
            instance_ids[border], class_ids[border] = 255, 255
        for folder, values in (("SegmentationObject", instance_ids), ("SegmentationClass", class_ids)):
            png = Image.fromarray(values, "P")
            png.putpalette(voc_palette())
            (png.convert("RGB") if rgb else png).save(root / folder / f"{image_id}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("2007_000001\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000002\n")
    return [("JPEGImages/2007_000001.jpg", "cat", cat), ("JPEGImages/2007_000001.jpg", "dog", dog),
            ("JPEGImages/2007_000002.jpg", "person", person)]


def cvat_runs(patch: np.ndarray) -> str:
    """CVAT's mask runs of a patch: row-major, a run of 0s first, alternating, comma and space between."""
    flat = patch.ravel().astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]]))
    return ", ".join(str(v) for v in ([0] if flat[0] else []) + runs.tolist())  # CVAT writes ", "


def write_cvat(root: Path) -> list[tuple[str, str, np.ndarray]]:
    """annotations.xml (meta labels cat, dog, bird) with images/ beside it: f1.png holds a box dog, a polygon
    cat, a mask cat, an ellipse dog, a polyline (skipped) and a cat of two polygons (group 3); f2.png nothing."""
    write_photo(root / "images" / "f1.png", seed=1)
    write_photo(root / "images" / "f2.png", seed=2)
    patch = patch_mask()

    def points(flat: list[float]) -> str:
        return ";".join(f"{flat[i]:.2f},{flat[i + 1]:.2f}" for i in range(0, len(flat), 2))

    labels = "".join(f"<label><name>{n}</name><color>#ff0000</color><type>any</type><attributes/></label>"
                     for n in ("cat", "dog", "bird"))
    common = 'source="manual" occluded="0" z_order="0"'
    shapes = [
        f'<box label="dog" {common} xtl="62.00" ytl="50.00" xbr="88.00" ybr="70.00"></box>',
        f'<polygon label="cat" {common} points="{points(PENTAGON)}"></polygon>',
        f'<mask label="cat" {common} rle="{cvat_runs(patch)}" left="40" top="30" width="24" height="20"></mask>',
        f'<ellipse label="dog" {common} cx="75.00" cy="25.00" rx="14.00" ry="14.00"></ellipse>',
        f'<polyline label="dog" {common} points="1.00,1.00;20.00,20.00"></polyline>',
        f'<polygon label="cat" {common} group_id="3" points="{points(PART_A)}"></polygon>',
        f'<polygon label="cat" {common} group_id="3" points="{points(PART_B)}"></polygon>',
    ]
    xml = (f'<?xml version="1.0" encoding="utf-8"?>\n<annotations><version>1.1</version><meta><task><id>1</id>'
           f'<name>t</name><labels>{labels}</labels></task></meta>'
           f'<image id="0" name="f1.png" width="{W}" height="{H}">{"".join(shapes)}</image>'
           f'<image id="1" name="f2.png" width="{W}" height="{H}"></image></annotations>\n')
    (root / "annotations.xml").write_text(xml)
    return [("f1.png", "dog", box_mask(62.0, 50.0, 88.0, 70.0)), ("f1.png", "cat", polygon_mask(PENTAGON)),
            ("f1.png", "cat", placed(patch, 40, 30)), ("f1.png", "dog", disk_mask(75.0, 25.0, 14.0)),
            ("f1.png", "cat", polygon_mask(PART_A) | polygon_mask(PART_B))]

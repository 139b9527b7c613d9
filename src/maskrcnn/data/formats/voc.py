"""Pascal VOC segmentation: `JPEGImages/<id>.jpg`, `SegmentationObject/<id>.png` (instance index per pixel: 0
background, 1..N objects, 255 the void border), `SegmentationClass/<id>.png` (class index per pixel, 0 background,
255 void) and `ImageSets/Segmentation/<split>.txt` (an id per line).

PNGs are palette images whose indices are read as they are; RGB PNGs are read through the colour map: VOC's own
(index i's colour from the bits of i, void (224, 224, 192)), or `labelmap.txt` (`name:r,g,b::` lines, as CVAT
and Datumaro write it) for the class PNGs. Classes: labelmap.txt, else class_names.txt (a name per line, the first
the background, as labelme2voc writes it), else VOC's 20. Category ids are the class indices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from maskrcnn.data.common import DatasetError, read_id_map
from maskrcnn.data.formats.builder import IMAGE_EXTENSIONS, CocoBuilder, Conversion

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
VOID = 255


def voc_colormap(count: int = 256) -> np.ndarray:
    """u8[count, 3]: VOC's colour of each index (bit j of the index sets bit 7 - j // 3 of one of r, g, b)."""
    index = np.arange(count)
    colours = np.zeros((count, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            colours[:, channel] |= ((index >> (3 * shift + channel)) & 1) << (7 - shift)
    return colours.astype(np.uint8)


def convert_voc(root: str | Path, split: str | None = None) -> Conversion:
    """A VOC segmentation folder as COCO; file_names are relative to `root`.

    Args:
        root: the folder holding JPEGImages/, SegmentationObject/ and SegmentationClass/.
        split: a list of ImageSets/Segmentation (e.g. "train"); None: every image with an object PNG.
    Raises:
        DatasetError: a missing folder, list, image or PNG, a colour outside the colour map, an object covering
            two classes, or a PNG of another size than its image (file and object named).
    """
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationObject", "SegmentationClass"):
        if not (root / sub).is_dir():
            raise DatasetError(f"{root}: not a VOC folder (no {sub}/)")
    names, class_colours = _classes(root)
    builder = CocoBuilder({i: name for i, name in enumerate(names) if i > 0}, root)
    for image_id in _image_ids(root, split):
        _add_image(builder, root, image_id, class_colours)
    return builder.result()


def _classes(root: Path) -> tuple[list[str], np.ndarray]:
    """Class names by index (0 the background) and u8[K, 3] their colours."""
    labelmap, class_file = root / "labelmap.txt", root / "class_names.txt"
    if labelmap.is_file():
        names, colours = [], []
        for number, line in enumerate(labelmap.read_text().splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            fields = line.split(":")
            try:
                colour = [int(v) for v in fields[1].split(",")]
            except (IndexError, ValueError):
                colour = []
            if len(colour) != 3 or not all(0 <= v <= 255 for v in colour):
                raise DatasetError(f"{labelmap}:{number}: expected 'name:r,g,b::', got {line.strip()[:80]!r}")
            names.append(fields[0].strip())
            colours.append(colour)
        return names, np.array(colours, dtype=np.uint8).reshape(-1, 3)
    if class_file.is_file():
        names = [line.strip() for line in class_file.read_text().splitlines() if line.strip()]
    else:
        names = list(VOC_CLASSES)
    return names, voc_colormap(len(names))


def _image_ids(root: Path, split: str | None) -> list[str]:
    if split is None:
        return sorted(p.stem for p in (root / "SegmentationObject").glob("*.png"))
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise DatasetError(f"{listing}: split list not found")
    return [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]


def _indices(path: Path, colours: np.ndarray, what: str) -> np.ndarray:
    """i64[H, W]: a label PNG's indices, RGB pixels mapped through `colours` (u8[K, 3]; void to 255)."""
    values = read_id_map(path)
    if values.ndim == 2:
        return values.astype(np.int64)
    rgb = values[..., :3].astype(np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # [H, W]
    table = (colours[:, 0].astype(np.int64) << 16) | (colours[:, 1].astype(np.int64) << 8) | colours[:, 2]
    lookup = {int(code): index for index, code in reversed(list(enumerate(table)))}
    lookup[(224 << 16) | (224 << 8) | 192] = VOID
    unique, inverse = np.unique(codes, return_inverse=True)
    unknown = [code for code in unique.tolist() if code not in lookup]
    if unknown:
        rgb_text = ", ".join(str(((c >> 16) & 255, (c >> 8) & 255, c & 255)) for c in unknown[:3])
        raise DatasetError(f"{path}: colour(s) {rgb_text} are in no {what} colour map")
    return np.array([lookup[c] for c in unique.tolist()], dtype=np.int64)[inverse].reshape(codes.shape)


def _add_image(builder: CocoBuilder, root: Path, image_id: str, class_colours: np.ndarray) -> None:
    object_png = root / "SegmentationObject" / f"{image_id}.png"
    class_png = root / "SegmentationClass" / f"{image_id}.png"
    candidates = [root / "JPEGImages" / f"{image_id}{ext}" for ext in IMAGE_EXTENSIONS]
    image_file = next((c for c in candidates if c.is_file()), candidates[0])
    image = builder.add_image(image_file, object_png)
    objects = _indices(object_png, voc_colormap(), "instance")
    classes = _indices(class_png, class_colours, "class")
    for png, values in ((object_png, objects), (class_png, classes)):
        if values.shape != (image["height"], image["width"]):
            raise DatasetError(f"{png}: {values.shape[1]} x {values.shape[0]} pixels but its image {image_file} "
                               f"is {image['width']} x {image['height']}")
    for index in np.unique(objects).tolist():
        if index in (0, VOID):
            continue
        mask = objects == index
        covered = np.unique(classes[mask])
        covered = covered[covered != VOID]
        if len(covered) != 1 or covered[0] == 0 or covered[0] >= len(class_colours):
            raise DatasetError(f"{object_png}: object {index} covers class index(es) {covered.tolist()} in "
                               f"{class_png}; an object has one class, not the background")
        builder.add_instance(image, int(covered[0]), f"{object_png}: object {index}", masks=[mask])

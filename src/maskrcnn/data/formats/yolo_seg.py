"""Ultralytics YOLO segmentation: one `.txt` per image, a line per instance `class x1 y1 x2 y2 ...` (a polygon in
coordinates normalised by the image's width and height), the label of `.../images/.../a.jpg` at
`.../labels/.../a.txt` (beside the image when its path has no `images` folder). A line with 4 coordinates is a box
`class cx cy w h` (the detection format); an image without a label file has no instances.

The source is either Ultralytics' dataset yaml: `path` (the data set's root; relative: to the yaml's folder, else
the working directory; absent: the yaml's folder), `train` / `val` / `test` (each a folder of images, a .txt list
of images, or a list of those; relative to the root) and `names` (a list, or a dict class index -> name); or a
folder with `classes.txt` (a name per line) and its images, under `images/` when that exists.
Category ids are the class indices + 1.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from maskrcnn.data.common import DatasetError
from maskrcnn.data.formats.builder import IMAGE_EXTENSIONS, CocoBuilder, Conversion, rectangle_polygon


def convert_yolo_seg(source: str | Path, split: str | None = None) -> Conversion:
    """A YOLO segmentation split as COCO; file_names are relative to the data set's root.

    Args:
        source: the dataset yaml, or a folder with classes.txt.
        split: the yaml's key of the images to convert (default "train"); a folder has no splits.
    Raises:
        DatasetError: a bad yaml, a missing split or folder, or a malformed label line (file and line named).
    """
    source = Path(source)
    if source.is_dir():
        if split is not None:
            raise DatasetError(f"{source}: a folder with classes.txt has no splits; give the dataset yaml for "
                               f"--split {split}")
        names = _read_class_list(source / "classes.txt")
        root = source
        images = _images_in(source / "images" if (source / "images").is_dir() else source)
    else:
        root, names, images = _read_yaml(source, split or "train")
    builder = CocoBuilder({index + 1: name for index, name in names.items()}, root)
    for image_file in images:
        _add_image(builder, image_file, names)
    return builder.result()


def _read_class_list(path: Path) -> dict[int, str]:
    if not path.is_file():
        raise DatasetError(f"{path}: class list not found (a YOLO folder needs classes.txt, a name per line; or give "
                           f"the dataset yaml)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"{path}: no class name in the class list")
    return dict(enumerate(names))


def _read_yaml(path: Path, split: str) -> tuple[Path, dict[int, str], list[Path]]:
    """The root, classes and image files of one split of a dataset yaml."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: dataset yaml not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a dataset yaml is a mapping with path, train, val and names")
    names = data.get("names")
    if isinstance(names, list) and all(isinstance(n, str) for n in names) and names:
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names or not all(
            isinstance(k, int) and k >= 0 and isinstance(v, str) for k, v in names.items()):
        raise DatasetError(f"{path}: 'names' must be a list of class names or a mapping index -> name, got "
                           f"{names!r:.80}")
    root = _root(path, data.get("path"))
    entries = data.get(split)
    if entries is None:
        raise DatasetError(f"{path}: no '{split}' entry (the images of that split)")
    entries = entries if isinstance(entries, list) else [entries]
    if not all(isinstance(e, str) for e in entries):
        raise DatasetError(f"{path}: '{split}' must be a folder, a .txt list of images, or a list of those")
    images: list[Path] = []
    for entry in entries:
        location = root / entry
        if location.is_dir():
            images += _images_in(location)
        elif location.is_file() and location.suffix == ".txt":
            images += _listed_images(location)
        else:
            raise DatasetError(f"{path}: '{split}' entry {entry!r}: {location} is neither a folder nor a .txt list")
    return root, names, images


def _root(path: Path, stated: object) -> Path:
    if stated is None or stated == "":
        return path.parent
    if not isinstance(stated, str):
        raise DatasetError(f"{path}: 'path' must be the data set's folder, got {stated!r:.40}")
    for candidate in (path.parent / stated, Path(stated)):
        if candidate.is_dir():
            return candidate
    raise DatasetError(f"{path}: path {stated!r} is not a folder (tried beside the yaml and in the working "
                       f"directory)")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _listed_images(listing: Path) -> list[Path]:
    """The images of a .txt list, a path per line; relative ones are relative to the list's folder."""
    lines = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    return [listing.parent / line if not Path(line).is_absolute() else Path(line) for line in lines]


def label_file(image_file: Path) -> Path:
    """Ultralytics' rule: the last `images` folder of the path becomes `labels`, the suffix `.txt`."""
    parts = list(image_file.parts)
    if "images" in parts[:-1]:
        last = len(parts) - 2 - parts[-2::-1].index("images")
        parts[last] = "labels"
    return Path(*parts).with_suffix(".txt")


def _add_image(builder: CocoBuilder, image_file: Path, names: dict[int, str]) -> None:
    labels = label_file(image_file)
    image = builder.add_image(image_file, labels)
    if not labels.is_file():
        return
    width, height = image["width"], image["height"]
    for number, line in enumerate(labels.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{labels}:{number}"
        index, values = _parse_line(line, where, names)
        if len(values) == 4:
            cx, cy, w, h = values
            values = rectangle_polygon(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        polygon = [v * (width if i % 2 == 0 else height) for i, v in enumerate(values)]
        builder.add_instance(image, index + 1, where, polygons=[polygon])


def _parse_line(line: str, where: str, names: dict[int, str]) -> tuple[int, list[float]]:
    """(class index, normalised coordinates) of one label line, checked."""
    parts = line.split()
    try:
        number = float(parts[0])
        values = [float(v) for v in parts[1:]]
    except ValueError:
        raise DatasetError(f"{where}: not numbers: {line.strip()[:80]!r}") from None
    if not number.is_integer() or int(number) not in names:
        raise DatasetError(f"{where}: class {parts[0]} is not one of the {len(names)} classes of the names")
    if len(values) != 4 and (len(values) < 6 or len(values) % 2):
        raise DatasetError(f"{where}: {len(values)} coordinates; a polygon needs at least 3 x, y pairs (a box: "
                           f"cx cy w h)")
    if not all(-0.01 <= v <= 1.01 for v in values):
        raise DatasetError(f"{where}: coordinates must be normalised to 0..1 by the image's width and height")
    return int(number), values

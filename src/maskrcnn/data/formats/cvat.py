"""CVAT for images 1.1: one XML, `<annotations>` with the classes in `<meta>` (`.../labels/label/name`) and an
`<image id name width height [subset]>` per image holding its shapes:

- `<box xtl ytl xbr ybr [rotation]>`, `<polygon points="x,y;x,y;...">`, `<ellipse cx cy rx ry [rotation]>`;
- `<mask rle left top width height>`: the runs of a width x height patch at (left, top), row by row, starting
  with a run of 0s and alternating (CVAT's own mask encoding);
- `<polyline>`, `<points>`, `<cuboid>`, `<skeleton>`, `<tag>`: no regions, skipped (counted).

Shapes with the same label and the same non-zero `group_id` form one instance. Image names are relative to the
images folder: `images/` beside the XML when it exists (CVAT's export with images), else the XML's folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from xml.etree import ElementTree

import numpy as np

from maskrcnn.data.common import DatasetError
from maskrcnn.data.formats.builder import CocoBuilder, Conversion, ellipse_polygon, rectangle_polygon

NOT_REGIONS = ("polyline", "points", "cuboid", "skeleton", "tag")


def convert_cvat(xml_path: str | Path, images_dir: str | Path | None = None, split: str | None = None) -> Conversion:
    """A CVAT for images XML as COCO.

    Args:
        xml_path: the annotations.xml.
        images_dir: folder of the images (None: images/ beside the XML, else the XML's folder).
        split: keep only the images of this `subset` (CVAT projects export one); None: every image.
    Raises:
        DatasetError: bad XML, a CVAT for video file (tracks), an unknown label, or a malformed shape or image
            (image and shape named).
    """
    xml_path = Path(xml_path)
    try:
        root = ElementTree.parse(xml_path).getroot()
    except FileNotFoundError:
        raise DatasetError(f"{xml_path}: annotation file not found") from None
    except ElementTree.ParseError as error:
        raise DatasetError(f"{xml_path}: not valid XML ({error})") from None
    if root.tag != "annotations":
        raise DatasetError(f"{xml_path}: not a CVAT XML (the root element is <{root.tag}>, not <annotations>)")
    if root.find("track") is not None:
        raise DatasetError(f"{xml_path}: CVAT for video (tracks); export the task as 'CVAT for images 1.1'")
    if images_dir is None:
        images_dir = xml_path.parent / "images" if (xml_path.parent / "images").is_dir() else xml_path.parent
    names = _label_names(root)
    builder = CocoBuilder({i: name for i, name in enumerate(names, start=1)}, Path(images_dir))
    ids = {name: i for i, name in enumerate(names, start=1)}
    for element in root.iter("image"):
        if split is None or element.get("subset") == split:
            _add_image(builder, element, ids, xml_path)
    return builder.result()


def _label_names(root: ElementTree.Element) -> list[str]:
    """The meta's label names in order, else every label the shapes use (in order of appearance)."""
    names = [label.findtext("name") for label in root.iterfind("meta//labels/label")]
    if not names:
        names = [shape.get("label") for image in root.iter("image") for shape in image]
    return list(dict.fromkeys(name for name in names if name))


def _number(element: ElementTree.Element, key: str, where: str) -> float:
    try:
        value = float(element.get(key, "nan"))
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DatasetError(f"{where}: attribute {key} must be a finite number, got {element.get(key)!r:.40}")
    return value


def _add_image(builder: CocoBuilder, element: ElementTree.Element, ids: dict[str, int], xml_path: Path) -> None:
    name = element.get("name")
    where = f"{xml_path}: image {element.get('id')}"
    if not name:
        raise DatasetError(f"{where}: no 'name' attribute")
    stated = (int(_number(element, "height", where)), int(_number(element, "width", where)))
    image = builder.add_image(builder.images_dir / name, where, stated)
    instances: dict[object, dict] = {}
    for index, shape in enumerate(element):
        if shape.tag in NOT_REGIONS:
            builder.skipped[shape.tag] += 1
            continue
        shape_where = f"{where} ({name}): {shape.tag} {index}"
        label = shape.get("label")
        if label not in ids:
            raise DatasetError(f"{shape_where}: label {label!r} is not one of the meta's labels {list(ids)}")
        group = shape.get("group_id", "0")
        key = (label, group) if group not in ("", "0") else index
        instance = instances.setdefault(key, {"label": label, "shapes": [], "polygons": [], "masks": []})
        instance["shapes"].append(index)
        region = _region(shape, image, shape_where)
        instance["masks" if isinstance(region, np.ndarray) else "polygons"].append(region)
    for instance in instances.values():
        shapes = ", ".join(map(str, instance["shapes"]))
        builder.add_instance(image, ids[instance["label"]], f"{where} ({name}): shape(s) {shapes}",
                             instance["polygons"], instance["masks"])


def _region(shape: ElementTree.Element, image: dict, where: str) -> list[float] | np.ndarray:
    """A shape's region: a flat polygon, or bool[H, W] for a mask."""
    if shape.tag == "box":
        x1, y1, x2, y2 = (_number(shape, key, where) for key in ("xtl", "ytl", "xbr", "ybr"))
        angle = _number(shape, "rotation", where) if shape.get("rotation") else 0.0
        return _turned(rectangle_polygon(x1, y1, x2, y2), angle)
    if shape.tag == "ellipse":
        cx, cy, rx, ry = (_number(shape, key, where) for key in ("cx", "cy", "rx", "ry"))
        angle = _number(shape, "rotation", where) if shape.get("rotation") else 0.0
        return ellipse_polygon(cx, cy, rx, ry, angle)
    if shape.tag == "polygon":
        try:
            flat = [float(v) for pair in shape.get("points", "").split(";") for v in pair.split(",")]
        except ValueError:
            flat = []
        if len(flat) < 6 or len(flat) % 2 or not all(math.isfinite(v) for v in flat):
            raise DatasetError(f"{where}: points must be at least 3 'x,y' pairs separated by ';', got "
                               f"{shape.get('points')!r:.80}")
        return flat
    if shape.tag == "mask":
        return _decode_mask(shape, image, where)
    raise DatasetError(f"{where}: unknown shape <{shape.tag}> (box, polygon, ellipse, mask, or one of "
                       f"{', '.join(NOT_REGIONS)})")


def _turned(polygon: list[float], angle_degrees: float) -> list[float]:
    """The polygon turned clockwise on screen by `angle_degrees` about its centre (CVAT's rotated boxes)."""
    if not angle_degrees:
        return polygon
    points = np.asarray(polygon).reshape(-1, 2)
    centre = points.mean(axis=0)
    turn = math.radians(angle_degrees)
    rotation = np.array([[math.cos(turn), math.sin(turn)], [-math.sin(turn), math.cos(turn)]])
    return ((points - centre) @ rotation + centre).ravel().tolist()


def _decode_mask(shape: ElementTree.Element, image: dict, where: str) -> np.ndarray:
    """bool[H, W]: the runs of the patch (0s first, alternating, row-major) placed at (left, top), clipped."""
    left, top, width, height = (int(_number(shape, key, where)) for key in ("left", "top", "width", "height"))
    try:
        runs = np.array([int(v) for v in shape.get("rle", "").split(",")], dtype=np.int64)
    except ValueError:
        raise DatasetError(f"{where}: rle must be comma-separated run lengths") from None
    if width <= 0 or height <= 0 or (runs < 0).any() or runs.sum() != width * height:
        raise DatasetError(f"{where}: rle runs add up to {int(runs.sum())} pixels but the patch is {width} x "
                           f"{height} = {width * height}")
    values = np.repeat(np.arange(len(runs)) % 2 == 1, runs).reshape(height, width)  # odd runs are the 1s
    full = np.zeros((image["height"], image["width"]), dtype=bool)
    y0, y1 = max(top, 0), min(top + height, image["height"])
    x0, x1 = max(left, 0), min(left + width, image["width"])
    if y0 < y1 and x0 < x1:
        full[y0:y1, x0:x1] = values[y0 - top:y1 - top, x0 - left:x1 - left]
    return full

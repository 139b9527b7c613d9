"""A browsable page of evaluated images: one static HTML file plus its pictures, no server, no network.

Every pictured image shows its ground truth, predictions and masks (each can be switched off), a score slider
sets which predictions are drawn, and filters by class and by what each prediction or object turned out to be in
the error analysis (a match, a classification / localisation / both / duplicate / background error, a missed
object). The page's script draws on canvases from the data embedded in the page (boxes, COCO RLE masks, kinds);
its template is the package's `viz/assets/browse.html`.

The same page shows ground truth alone (`write_truth_page`, for `maskrcnn data check`): no predictions and none of
their controls, masks in class colours, each object named with its annotation id, filters by class and by the
problems the check found, pictures embedded in the one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from importlib import resources
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image
from torchvision.transforms.functional import resize

from maskrcnn.engine.analysis import DETECTION_KINDS, ERROR_NAMES
from maskrcnn.engine.coco_results import counts_str
from maskrcnn.engine.views import ImageView
from maskrcnn.fileio import write_text_atomic
from maskrcnn.viz.draw import KIND_COLORS, class_colors

PNG_MAX_PIXELS = 256 * 256  # smaller pictures (e.g. the synthetic shapes) are PNG, photos JPEG: a small run folder
JPEG_QUALITY = 90
MIN_SIDE = 384  # the page enlarges smaller images to this shorter side so that labels stay readable
KIND_NAMES = {"tp": "match", **ERROR_NAMES, "ignored": "ignored (crowd region)"}
TRUTH_MAX_SIDE = 768  # the ground-truth page pictures a larger image (and its masks) downscaled to this longer side


def encode_picture(image) -> tuple[bytes, str]:
    """uint8 [3, H, W] -> (its PNG for small images or JPEG for photos, "png" | "jpeg")."""
    pixels = np.ascontiguousarray(image.permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)
    buffer = io.BytesIO()
    if pixels.shape[0] * pixels.shape[1] <= PNG_MAX_PIXELS:
        Image.fromarray(pixels).save(buffer, format="png")
        return buffer.getvalue(), "png"
    Image.fromarray(pixels).save(buffer, format="jpeg", quality=JPEG_QUALITY)
    return buffer.getvalue(), "jpeg"


def save_picture(image, folder: Path, stem: str) -> Path:
    """uint8 [3, H, W] -> folder/stem.png (small images) or .jpg (photos); returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    encoded, kind = encode_picture(image)
    path = folder / f"{stem}.{'png' if kind == 'png' else 'jpg'}"
    path.write_bytes(encoded)
    return path


def write_browse_page(
    path: str | Path,
    views: list[ImageView],
    *,
    class_names: list[str],
    title: str,
    score_thresh: float,
) -> Path:
    """Writes the page and its pictures (into a folder named after the page, next to it).

    Args:
        path: the HTML file to write.
        views: the images to picture, in page order.
        class_names: K foreground names; label k is class_names[k-1].
        title: the page's heading.
        score_thresh: the slider's starting position.
    Returns:
        path.
    """
    path = Path(path)
    folder = path.parent / path.stem
    images = []
    for view in views:
        picture = save_picture(view.image, folder, str(view.image_id))
        images.append({
            "id": view.image_id, "src": picture.relative_to(path.parent).as_posix(),
            "height": int(view.image.shape[-2]), "width": int(view.image.shape[-1]),
            "objects": view.objects,
            "detections": [{**d, "score": round(d["score"], 4), "box": [round(v, 1) for v in d["box"]]}
                           for d in view.detections],
        })
    data = {
        "classes": list(class_names),
        "classColors": class_colors(len(class_names)),
        "kinds": {kind: {"name": KIND_NAMES[kind], "color": KIND_COLORS[kind]}
                  for kind in (*DETECTION_KINDS, "missed")},
        "scoreThresh": score_thresh,
        "minSide": MIN_SIDE,
        "images": images,
    }
    return _write_page(path, title, data)


def truth_picture(view: ImageView, problems: list[dict], max_side: int = TRUTH_MAX_SIDE) -> dict:
    """One image's entry on the ground-truth page: its picture embedded (a data URL), downscaled with its objects'
    masks and boxes when its longer side is over `max_side` (a whole data set's photos stay one bounded file).

    Args:
        view: the image, objects {"box": [x1, y1, x2, y2], "label": 1..K, "mask": COCO RLE of the image's size,
            "id": annotation id, "crowd": bool, "problems": [problem kinds]}, no detections.
        problems: the image's problems (its annotations' included), {"kind", "message", "annotationId" or None}.
    """
    height, width = view.image.shape[-2:]
    step = math.ceil(max(height, width) / max_side)  # keep every step-th mask pixel: nearest-neighbour
    image, objects = view.image, view.objects
    if step > 1:
        image = resize(image, [math.ceil(height / step), math.ceil(width / step)], antialias=True)
        objects = [{**o, "box": [v / step for v in o["box"]], "mask": _decimated(o["mask"], step)} for o in objects]
    encoded, kind = encode_picture(image)
    return {"id": view.image_id, "src": f"data:image/{kind};base64," + base64.b64encode(encoded).decode("ascii"),
            "height": int(image.shape[-2]), "width": int(image.shape[-1]), "detections": [], "problems": problems,
            "objects": [{**o, "box": [round(v, 1) for v in o["box"]]} for o in objects]}


def _decimated(mask: dict, step: int) -> dict:
    """A COCO RLE keeping every step-th row and column of its mask."""
    pixels = np.asfortranarray(mask_utils.decode(mask)[::step, ::step])  # u8[ceil(H / step), ceil(W / step)]
    encoded = mask_utils.encode(pixels)
    return {"size": list(encoded["size"]), "counts": counts_str(encoded["counts"])}


def write_truth_page(path: str | Path, pictures: list[dict], *, class_names: list[str], title: str, note: str,
                     not_drawn: list[dict]) -> Path:
    """Writes the one-file page of ground truth only.

    Args:
        pictures: `truth_picture`s, in page order.
        class_names: K foreground names; label k is class_names[k-1].
        note: a line under the heading (e.g. how many of the set's images are pictured).
        not_drawn: images that could not be pictured, {"id", "message"}, listed under the heading.
    """
    kinds = sorted({problem["kind"] for picture in pictures for problem in picture["problems"]})
    data = {"truthOnly": True, "classes": list(class_names), "classColors": class_colors(len(class_names)),
            "kinds": {}, "problemKinds": kinds, "minSide": MIN_SIDE, "images": pictures, "note": note,
            "notDrawn": not_drawn}
    return _write_page(Path(path), title, data)


def _write_page(path: Path, title: str, data: dict) -> Path:
    template = resources.files("maskrcnn.viz").joinpath("assets/browse.html").read_text(encoding="utf-8")
    # "</" inside the embedded JSON would end its <script> element.
    page = template.replace("__TITLE__", html.escape(title)).replace("__DATA__", json.dumps(data).replace("</", "<\\/"))
    write_text_atomic(path, page)
    return path

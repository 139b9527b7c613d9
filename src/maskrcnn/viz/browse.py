"""A browsable page of evaluated images: one static HTML file plus its pictures, no server, no network.

Every pictured image shows its ground truth, predictions and masks (each can be switched off), a score slider
sets which predictions are drawn, and filters by class and by what each prediction or object turned out to be in
the error analysis (a match, a classification / localisation / both / duplicate / background error, a missed
object). The page's script draws on canvases from the data embedded in the page (boxes, COCO RLE masks, kinds);
its template is the package's `viz/assets/browse.html`.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from maskrcnn.engine.analysis import DETECTION_KINDS, ERROR_NAMES
from maskrcnn.engine.views import ImageView
from maskrcnn.fileio import write_text_atomic
from maskrcnn.viz.draw import KIND_COLORS, class_colors

PNG_MAX_PIXELS = 256 * 256  # smaller pictures (e.g. the synthetic shapes) are PNG, photos JPEG: a small run folder
JPEG_QUALITY = 90
MIN_SIDE = 384  # the page enlarges smaller images to this shorter side so that labels stay readable
KIND_NAMES = {"tp": "match", **ERROR_NAMES, "ignored": "ignored (crowd region)"}


def save_picture(image, folder: Path, stem: str) -> Path:
    """uint8 [3, H, W] -> folder/stem.png (small images) or .jpg (photos); returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.ascontiguousarray(image.permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)
    if pixels.shape[0] * pixels.shape[1] <= PNG_MAX_PIXELS:
        path = folder / f"{stem}.png"
        Image.fromarray(pixels).save(path)
    else:
        path = folder / f"{stem}.jpg"
        Image.fromarray(pixels).save(path, quality=JPEG_QUALITY)
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
    template = resources.files("maskrcnn.viz").joinpath("assets/browse.html").read_text(encoding="utf-8")
    # "</" inside the embedded JSON would end its <script> element.
    page = template.replace("__TITLE__", html.escape(title)).replace("__DATA__", json.dumps(data).replace("</", "<\\/"))
    write_text_atomic(path, page)
    return path

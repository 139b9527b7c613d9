"""The browsable page in a real browser (headless Chromium driven by Playwright): the score slider, the toggles and
the filters change what is drawn. Skips where no Chromium or no Playwright is installed, unless
MASKRCNN_REQUIRE_BROWSER is 1 (then it fails: tests/browser.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from browser import chromium
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.engine.views import ImageView
from maskrcnn.viz.browse import write_browse_page
from maskrcnn.viz.draw import class_colors

SIDE = 40  # the page enlarges the 40 px images to 384 px (scale 10)


def rle(x1: int, y1: int, x2: int, y2: int) -> dict:
    mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
    mask[y1:y2, x1:x2] = 1
    encoded = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [SIDE, SIDE], "counts": encoded["counts"].decode("ascii")}


def item(box: list[int], label: int, kind: str, score: float | None = None) -> dict:
    entry = {"box": [float(v) for v in box], "label": label, "mask": rle(*box), "kind": {"bbox": kind, "segm": kind}}
    return entry if score is None else {**entry, "score": score}


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """Image 1: a found cat and a missed dog; a cat at 0.9 (match) and one at 0.3 on the background.
    Image 2 (white): a found cat; a cat at 0.6 (match) and a dog at 0.7 on it (classification error)."""
    folder = tmp_path_factory.mktemp("browse")
    black = torch.zeros(3, SIDE, SIDE, dtype=torch.uint8)
    white = torch.full((3, SIDE, SIDE), 255, dtype=torch.uint8)
    views = [
        ImageView(image_id=1, image=black, objects=[item([2, 2, 12, 12], 1, "tp"), item([20, 20, 30, 30], 2, "missed")],
                  detections=[item([2, 2, 12, 12], 1, "tp", 0.9), item([25, 2, 35, 8], 1, "bkg", 0.3)]),
        ImageView(image_id=2, image=white, objects=[item([5, 5, 25, 25], 1, "tp")],
                  detections=[item([5, 5, 25, 25], 1, "tp", 0.6), item([6, 6, 25, 25], 2, "cls", 0.7)]),
    ]
    path = write_browse_page(folder / "browse_val.html", views, class_names=["cat", "dog"], title="tiny",
                             score_thresh=0.5)
    with chromium() as browser:
        tab = browser.new_page()
        tab.goto(path.as_uri())
        tab.wait_for_selector("body[data-ready=yes]", timeout=20_000)
        yield tab


def shown(page, image_id: int) -> dict:
    figure = page.locator(f"figure[data-id='{image_id}']")
    return {"hidden": figure.evaluate("f => f.hidden"),
            **{key: int(figure.get_attribute(f"data-{key}")) for key in ("detections", "objects", "masks")}}


def pixel(page, image_id: int, x: int, y: int) -> list[int]:
    """RGB of an image's canvas at (x, y), from a screenshot (a page opened from file:// may not read its canvas)."""
    png = page.locator(f"figure[data-id='{image_id}'] canvas").screenshot()
    return list(Image.open(io.BytesIO(png)).convert("RGB").getpixel((x, y)))


def test_slider_toggles_and_filters_change_what_is_shown(page):
    # At the starting score 0.5: image 1 draws its 0.9 cat (not the 0.3 one) and both objects, with their masks.
    assert shown(page, 1) == {"hidden": False, "detections": 1, "objects": 2, "masks": 3}
    assert shown(page, 2) == {"hidden": False, "detections": 2, "objects": 1, "masks": 3}
    assert page.text_content("#count") == "2 of 2 images"
    # Inside the 0.9 cat's mask (image pixels 2..12, x10): its class colour over black and the white GT mask.
    inside = pixel(page, 1, 70, 110)
    assert inside[2] > inside[0]  # the first tab10 colour is blue
    page.fill("#score", "0.2")  # the slider
    assert shown(page, 1)["detections"] == 2 and page.text_content("#score-value") == "0.20"
    page.fill("#score", "0.65")
    assert shown(page, 2)["detections"] == 1  # the dog at 0.7 stays, the cat at 0.6 goes
    page.uncheck("#show-masks")
    assert shown(page, 1)["masks"] == 0 and pixel(page, 1, 70, 110) == [0, 0, 0]  # black image, no mask
    page.uncheck("#show-gt")
    assert shown(page, 1)["objects"] == 0
    page.check("#show-gt")
    page.check("#show-masks")
    # Only missed objects: image 2 has none and is hidden; image 1 shows the missed dog alone.
    for kind in ("tp", "cls", "loc", "both", "dupe", "bkg", "ignored"):
        page.uncheck(f"input[data-kind='{kind}']")
    assert shown(page, 1) == {"hidden": False, "detections": 0, "objects": 1, "masks": 1}
    assert shown(page, 2)["hidden"] and page.text_content("#count") == "1 of 2 images"
    page.check("input[data-kind='cls']")
    page.uncheck("input[data-class='dog']")  # the classification error is a dog: filtered out by class
    assert shown(page, 2)["hidden"]
    page.check("input[data-class='dog']")
    assert shown(page, 2) == {"hidden": False, "detections": 1, "objects": 0, "masks": 1}


def test_boxes_in_class_colours_labels_on_dark_chips(page):
    page.fill("#score", "0.5")
    for kind in ("tp", "cls", "loc", "both", "dupe", "bkg", "ignored", "missed"):
        page.check(f"input[data-kind='{kind}']")
    # Image 1 (black): the 0.9 cat's box, x 2..12 of the image, is stroked at canvas x = 20 in the cat's colour.
    assert pixel(page, 1, 20, 60) == list(class_colors(2)[0])
    # Image 2 (white): the 0.6 cat's label sits above its box (canvas y < 50) on a dark chip, not on the photo.
    assert max(pixel(page, 2, 51, 40)) < 80 and min(pixel(page, 2, 51, 300)) == 255  # chip; plain photo

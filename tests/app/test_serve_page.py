"""The page of `maskrcnn serve` (GET /) in a real browser, headless Chromium driven by Playwright (tests/browser.py),
against the real server: an image picked or dropped is sent, its masks are painted in their class colours over the
photo and its boxes carry labels, the score slider changes what is drawn, the JSON beside it lists what is drawn.
Skips without Chromium or Playwright, unless MASKRCNN_REQUIRE_BROWSER is 1 (then it fails)."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
from browser import chromium
from PIL import Image
from pycocotools import mask as mask_utils
from serving import serving

pytest.importorskip("fastapi", reason="maskrcnn serve needs the serve extra: pip install 'maskrcnn[serve]'")

PALETTE = {1: (0xe6, 0x19, 0x4b), 2: (0x3c, 0xb4, 0x4b)}  # the page's colours of categories 1 and 2
MASK_ALPHA = 110 / 255  # the page's mask fill over the photo
LABEL_HEIGHT = 18  # a 12 px label with 3 px of padding above and below, on a 64 px image


def photo(height: int, width: int) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(60, 120, (height, width, 3), dtype=np.uint8)
    pixels[8:24, 8:24] = (230, 220, 40)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def page(tiny_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_page") / "serve.log"
    with chromium() as browser, serving(tiny_run / "last.pt", log, "--max-wait-ms", "0") as server:
        tab = browser.new_page()
        tab.goto(server.url + "/")
        tab.wait_for_selector("body[data-ready=yes]", timeout=20_000)
        yield tab


def drawn(page) -> dict:
    canvas = page.locator("#canvas")
    return {"drawn": int(canvas.get_attribute("data-drawn")), "masks": int(canvas.get_attribute("data-masks")),
            "listed": len(listed(page))}


def listed(page) -> list[dict]:
    """The detections of the JSON beside the picture."""
    return page.evaluate("JSON.parse(document.getElementById('json').textContent).detections")


def slide(page, value: float) -> None:
    page.evaluate("v => { const s = document.getElementById('score'); s.value = v; "
                  "s.dispatchEvent(new Event('input')); }", str(value))


def canvas_pixels(page) -> np.ndarray:
    """uint8[H, W, 3] of the canvas as drawn."""
    height, width, data = page.evaluate("""() => { const c = document.getElementById('canvas');
        return [c.height, c.width, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]; }""")
    return np.array(data, dtype=np.uint8).reshape(height, width, 4)[..., :3]


def label_top(detection: dict) -> int:
    """The top row of a detection's label: above its box, inside it at the image's top edge."""
    y = int(detection["bbox"][1])
    return y - LABEL_HEIGHT if y >= LABEL_HEIGHT else y


def painted_last(detections: list[dict]) -> tuple[tuple[int, int], np.ndarray]:
    """A pixel (y, x) of the last drawn detection's mask (painted over the others) away from every box's outline
    and label, and bool[H, W] of the pixels no mask, box or label covers."""
    masks = np.stack([mask_utils.decode(d["segmentation"]).astype(bool) for d in detections])
    yy, xx = np.mgrid[:masks.shape[1], :masks.shape[2]]
    near_drawing = np.zeros(masks.shape[1:], dtype=bool)
    for d in detections:
        x, y, w, h = d["bbox"]
        around_box = (xx > x - 3) & (xx < x + w + 3) & (yy > y - 3) & (yy < y + h + 3)
        inside_box = (xx > x + 3) & (xx < x + w - 3) & (yy > y + 3) & (yy < y + h - 3)
        label_rows = (yy >= label_top(d) - 1) & (yy <= label_top(d) + LABEL_HEIGHT) & (xx >= x - 1)
        near_drawing |= (around_box & ~inside_box) | label_rows
    candidates = np.argwhere(masks[-1] & ~near_drawing)
    assert len(candidates), "the last drawn mask has no pixel clear of the boxes and labels"
    return tuple(candidates[len(candidates) // 2]), ~masks.any(0) & ~near_drawing


def test_a_picked_image_is_drawn_and_the_slider_changes_what_is_drawn(page, tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(photo(64, 64))
    page.set_input_files("#file", str(path))
    page.wait_for_selector("body[data-state=done]", timeout=30_000)
    detections = page.evaluate("answer.detections")
    scores = [d["score"] for d in detections]
    assert len(detections) > 1 and max(scores) < 0.5  # the barely trained model's scores are about 0.33
    assert drawn(page) == {"drawn": 0, "masks": 0, "listed": 0}  # the slider starts at 0.5
    plain = canvas_pixels(page)
    original = np.asarray(Image.open(path).convert("RGB"))
    assert np.abs(plain.astype(int) - original).max() <= 1  # the photo alone, as sent

    slide(page, 0)
    count = len(detections)
    assert drawn(page) == {"drawn": count, "masks": count, "listed": count}
    assert listed(page) == detections
    assert page.text_content("#count") == f"{count} of {count} detections shown"
    best = detections[0]
    assert tuple(canvas_pixels(page)[label_top(best) + 1, int(best["bbox"][0]) + 1]) == PALETTE[best["category_id"]]

    top = math.floor(max(scores) * 1000) / 1000  # on the slider's 0.001 steps, at most the best score
    slide(page, top)
    kept = [d for d in detections if d["score"] >= top]
    assert drawn(page)["drawn"] == len(kept) >= 1 and listed(page) == kept
    at, untouched = painted_last(kept)  # masks are painted in the answer's order: the last one shows on top
    colour = np.array(PALETTE[kept[-1]["category_id"]])
    expected = (1 - MASK_ALPHA) * original[at] + MASK_ALPHA * colour  # the class colour over the photo
    assert np.abs(canvas_pixels(page)[at].astype(int) - expected).max() <= 2, (at, expected)
    assert untouched.any() and (canvas_pixels(page)[untouched] == plain[untouched]).all()  # the photo there

    slide(page, 1)
    assert drawn(page) == {"drawn": 0, "masks": 0, "listed": 0} and (canvas_pixels(page) == plain).all()


def test_a_dropped_image_is_sent_and_drawn(page):
    data = base64.b64encode(photo(48, 80)).decode()
    page.evaluate("""data => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer}));
    }""", data)
    page.wait_for_function("document.getElementById('status').textContent.startsWith('dropped.png: 80 x 48')",
                           timeout=30_000)
    page.wait_for_selector("body[data-state=done]")
    assert page.evaluate("[document.getElementById('canvas').width, document.getElementById('canvas').height]") == [80, 48]
    slide(page, 0)
    assert drawn(page)["masks"] == len(page.evaluate("answer.detections")) > 0

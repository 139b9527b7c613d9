"""`data check`'s page of the ground truth: a planted set's page pictures the readable images with the objects
training would read (counted per image in the page's data), each problem under its image with its id, lists the
unreadable images, stays within --page-limit; in the real browser the objects are drawn in their class colours,
the class and problem filters hide what they should and no prediction control is shown."""

from __future__ import annotations

import argparse
import io
import json
import re

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from browser import chromium
from PIL import Image

from maskrcnn.cli_data import add_data_parsers
from maskrcnn.engine.views import ImageView
from maskrcnn.viz.browse import truth_picture
from maskrcnn.viz.draw import class_colors

H, W = 40, 60  # every image's size in the json
CAT = [5, 5, 25, 5, 25, 25, 5, 25]  # a 20 x 20 square, pixels 5..24
DOG = [35, 10, 55, 10, 55, 30, 35, 30]  # pixels x 35..54, y 10..29


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="maskrcnn")
    data_sub = parser.add_subparsers(dest="command").add_parser("data").add_subparsers(dest="data_command")
    add_data_parsers(data_sub)
    args = parser.parse_args(argv)
    return args.func(args)


def black(path, height=H, width=W):
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(path)


@pytest.fixture
def planted(tmp_path):
    """Image 1: a cat, a dog whose box is far from its mask (annotation 2), a 2-point polygon (annotation 5,
    refused); image 2: a dog as RLE and a crowd cat; image 3: missing; image 4: unreadable; image 5: no objects;
    image 6: its file is 50 x 30, not 60 x 40."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png", "e.png"):
        black(images / name)
    (images / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    black(images / "f.png", 30, 50)
    dog_mask = np.zeros((H, W), np.uint8, order="F")
    dog_mask[10:30, 35:55] = 1
    dog_rle = mask_utils.encode(dog_mask)
    coco = {
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "images": [{"id": i, "file_name": f"{name}.png", "height": H, "width": W}
                   for i, name in enumerate("abcdef", start=1)],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [CAT], "bbox": [5, 5, 20, 20], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": [DOG], "bbox": [0, 0, 5, 5], "iscrowd": 0},
            {"id": 5, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 5]], "bbox": [1, 1, 4, 4]},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [35, 10, 20, 20], "iscrowd": 0,
             "segmentation": {"size": [H, W], "counts": dog_rle["counts"].decode("ascii")}},
            {"id": 4, "image_id": 2, "category_id": 1, "segmentation": [CAT], "bbox": [5, 5, 20, 20], "iscrowd": 1},
            {"id": 6, "image_id": 6, "category_id": 1, "segmentation": [CAT], "bbox": [5, 5, 20, 20], "iscrowd": 0},
        ],
    }
    (tmp_path / "planted.json").write_text(json.dumps(coco))
    return tmp_path


def page_data(path) -> dict:
    found = re.search(r'<script type="application/json" id="data">(.*?)</script>', path.read_text(), re.DOTALL)
    return json.loads(found.group(1))


def test_the_page_of_a_planted_set(planted, capsys):
    root = planted
    argv = ["data", "check", str(root / "planted.json"), "--images", str(root / "images"), "--out",
            str(root / "summary.json")]
    assert run_cli(argv) == 1  # missing, unreadable, refused, size mismatch: training would fail
    assert f"wrote {root / 'summary.html'}: 4 of 6 images pictured" in capsys.readouterr().out
    data = page_data(root / "summary.html")  # beside the summary by default
    assert data["truthOnly"] and data["classes"] == ["cat", "dog"]
    images = {image["id"]: image for image in data["images"]}
    assert {i: len(image["objects"]) for i, image in images.items()} == {1: 2, 2: 2, 5: 0, 6: 1}
    assert all(image["src"].startswith("data:image/png;base64,") for image in images.values())  # one file
    assert [(o["id"], o["label"], o["crowd"], o["problems"]) for o in images[1]["objects"]] == [
        (1, 1, False, []), (2, 2, False, ["box_mask_disagree"])]
    assert images[2]["objects"][1]["crowd"] and images[2]["objects"][0]["box"] == [35, 10, 55, 30]
    assert sorted((p["kind"], p["annotationId"]) for p in images[1]["problems"]) == [
        ("bad_record", 5), ("box_mask_disagree", 2)]
    assert all("annotation 5" in p["message"] for p in images[1]["problems"] if p["kind"] == "bad_record")
    assert [p["kind"] for p in images[6]["problems"]] == ["size_mismatch"]
    assert (images[6]["height"], images[6]["width"]) == (H, W)  # drawn where the json puts its objects
    assert sorted(entry["id"] for entry in data["notDrawn"]) == [3, 4]
    assert data["note"].startswith("4 of 6 images pictured") and data["problemKinds"] == [
        "bad_record", "box_mask_disagree", "size_mismatch"]

    run_cli(argv + ["--page-limit", "2", "--page", str(root / "two.html")])
    assert [image["id"] for image in page_data(root / "two.html")["images"]] == [1, 6]  # those with problems first
    (root / "summary.html").unlink()
    run_cli(argv + ["--no-page"])
    assert not (root / "summary.html").exists()


def test_a_large_image_is_pictured_downscaled_with_its_masks():
    mask = np.zeros((H, W), np.uint8, order="F")
    mask[5:25, 5:25] = 1
    rle = mask_utils.encode(mask)
    view = ImageView(image_id=7, image=torch.zeros(3, H, W, dtype=torch.uint8), detections=[], objects=[
        {"box": [5.0, 5.0, 25.0, 25.0], "label": 1, "id": 1, "crowd": False, "problems": [],
         "mask": {"size": [H, W], "counts": rle["counts"].decode("ascii")}}])
    picture = truth_picture(view, [], max_side=20)  # every 3rd pixel: 40 x 60 -> 14 x 20
    assert (picture["height"], picture["width"]) == (14, 20)
    small = picture["objects"][0]
    assert small["mask"]["size"] == [14, 20] and small["box"] == [1.7, 1.7, 8.3, 8.3]
    assert mask_utils.area(small["mask"]) == 7 * 7  # rows and columns 6, 9, ..., 24 of 5..24


def pixel(tab, image_id: int, x: int, y: int) -> list[int]:
    png = tab.locator(f"figure[data-id='{image_id}'] canvas").screenshot()
    return list(Image.open(io.BytesIO(png)).convert("RGB").getpixel((x, y)))


def shown(tab, image_id: int) -> tuple[bool, int]:
    figure = tab.locator(f"figure[data-id='{image_id}']")
    return figure.evaluate("f => f.hidden"), int(figure.get_attribute("data-objects"))


def test_the_page_in_the_browser(planted):
    root = planted
    run_cli(["data", "check", str(root / "planted.json"), "--images", str(root / "images"), "--page",
             str(root / "truth.html")])
    with chromium() as context:
        tab = context.new_page()
        tab.goto((root / "truth.html").as_uri())
        tab.wait_for_selector("body[data-ready=yes]", timeout=20_000)
        assert not tab.is_visible("#score") and not tab.is_visible("#show-pred") and tab.is_visible("#problems")
        assert tab.text_content("#not-drawn summary") == "2 images not drawn (cannot be read)"
        assert "annotation 2" in tab.text_content("figure[data-id='1'] li[data-kind='box_mask_disagree']")
        cat, dog = class_colors(2)
        # The 40 px images are enlarged 10 times: image pixel (15, 15) is in the cat, (45, 20) in the dog.
        inside_cat, inside_dog = pixel(tab, 1, 150, 150), pixel(tab, 1, 450, 200)
        assert inside_cat[2] > 2 * inside_cat[0] and inside_cat[2] > 40  # tab10 blue at alpha 120 over black
        assert inside_dog[0] > 2 * inside_dog[2] and inside_dog[0] > 60  # tab10 orange
        assert cat[2] > cat[0] and dog[0] > dog[2]
        assert shown(tab, 1) == (False, 2) and tab.text_content("#count") == "4 of 4 images"
        tab.uncheck("input[data-class='dog']")
        assert shown(tab, 1) == (False, 1) and pixel(tab, 1, 450, 200) == [0, 0, 0]
        assert shown(tab, 2) == (False, 1)  # the crowd cat stays
        assert shown(tab, 5)[0] and tab.text_content("#count") == "3 of 4 images"  # nothing of the class left
        tab.check("input[data-class='dog']")
        tab.uncheck("input[data-problem='none']")  # images with problems only
        assert [shown(tab, i)[0] for i in (1, 2, 5, 6)] == [False, True, True, False]
        tab.uncheck("input[data-problem='size_mismatch']")
        assert shown(tab, 6)[0] and not shown(tab, 1)[0]

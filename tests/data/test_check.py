"""`data check`: the counts of a clean converted set, each of a planted set of problems named with its id, which of
them fail training, the JSON summary, and the command's exit status."""

import argparse
import copy
import json

import formatfiles as ff
import pytest

from maskrcnn.cli_data import add_data_parsers
from maskrcnn.data.check import check_dataset
from maskrcnn.data.formats import convert_source


def run_cli(argv: list[str]) -> int:
    """The `data` command as cli.py wires it: `add_data_parsers(data_sub)`."""
    parser = argparse.ArgumentParser(prog="maskrcnn")
    data_sub = parser.add_subparsers(dest="command").add_parser("data").add_subparsers(dest="data_command")
    add_data_parsers(data_sub)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def clean(tmp_path):
    """A LabelMe set converted to tmp_path/clean.json (images in tmp_path/lm): 3 images, 6 instances."""
    ff.write_labelme(tmp_path / "lm")
    coco = convert_source("labelme", tmp_path / "lm").coco
    (tmp_path / "clean.json").write_text(json.dumps(coco))
    return tmp_path, coco


def test_clean_data_counts_and_no_problem(clean, capsys):
    root, _ = clean
    result = check_dataset(root / "clean.json", root / "lm")
    assert result.problems == [] and not result.fails_training
    assert (result.images, result.annotations) == (3, 6)
    assert result.instances_per_class == {"cat": 3, "dog": 3}
    # areas: pentagon 2111, rectangle 26 x 20 = 520, circle r 15: 707, two parts 676 + 560, ring 16 x 18 - 36 = 252,
    # triangle 1332: small < 1024 <= medium
    assert result.sizes == {"small": 3, "medium": 3, "large": 0}
    assert result.empty_image_ids == [3] and result.crowd_regions == 0
    assert run_cli(["data", "check", str(root / "clean.json"), "--images", str(root / "lm"), "--strict"]) == 0
    assert "no problems" in capsys.readouterr().out


def plant(root, coco: dict) -> dict:
    """The clean set with one of each problem; returns {(kind, id): fails_training} of what was planted."""
    coco = copy.deepcopy(coco)
    (root / "lm" / "b.png").unlink()  # image 2: missing
    (root / "lm" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # image 3: unreadable
    ff.write_photo(root / "lm" / "d.png", height=10, width=12)
    coco["images"] += [{"id": 4, "file_name": "d.png", "height": ff.H, "width": ff.W},  # the file is 12 x 10
                       {"id": 1, "file_name": "a.png", "height": ff.H, "width": ff.W}]  # image id 1 again
    anns = coco["annotations"]
    first = anns[0]
    anns += [
        {**first},  # annotation id 1 again
        {**first, "id": 20, "category_id": 99},
        {**first, "id": 21, "segmentation": [[1, 1, 5, 5, 9, 9]], "bbox": [1, 1, 8, 8]},  # a line: no area
        {**first, "id": 22, "segmentation": [[-10, 2, 20, 2, 20, 20]], "bbox": [0, 2, 20, 18]},  # outside by 10 px
        {**first, "id": 23, "bbox": [70, 50, 20, 15]},  # the pentagon's mask but a box far from it
        {**first, "id": 24, "segmentation": [[1, 1, 5, 5]]},  # 2 points: CocoDataset refuses it
        {**first, "id": 25, "bbox": [5, 5, 0.5, 8], "segmentation": [[5, 5, 9, 5, 9, 9]]},  # box under 1 px
        {**first, "id": 26, "iscrowd": 1},
    ]
    (root / "planted.json").write_text(json.dumps(coco))
    return {("missing_image", 2): True, ("unreadable_image", 3): True, ("size_mismatch", 4): True,
            ("duplicate_id", 1): True, ("unknown_id", 20): True, ("degenerate_polygon", 21): False,
            ("empty_mask", 21): False, ("polygon_outside_image", 22): False, ("box_mask_disagree", 23): False,
            ("bad_record", 24): True, ("degenerate_box", 25): False}


def test_planted_problems_are_each_named_with_their_id(clean, capsys, tmp_path):
    root, coco = clean
    planted = plant(root, coco)
    result = check_dataset(root / "planted.json", root / "lm")
    found = {(p.kind, p.annotation_id if p.annotation_id is not None else p.image_id): p.fails_training
             for p in result.problems}
    assert found == {**planted, ("duplicate_id", 1): True}  # image 1 and annotation 1 twice: both duplicate_id
    assert sum(p.kind == "duplicate_id" for p in result.problems) == 2
    assert result.fails_training and result.crowd_regions == 1
    assert set(result.problems_by_image()) == {1, 2, 3, 4}
    out = tmp_path / "summary.json"
    assert run_cli(["data", "check", str(root / "planted.json"), "--images", str(root / "lm"), "--out",
                    str(out)]) == 1
    printed = capsys.readouterr().out
    for text in ("image 2:", "image 3:", "image 4:", "duplicate image id 1", "duplicate annotation id 1",
                 "annotation 20 has unknown category id 99", "annotation 21: polygon 0 has zero area",
                 "annotation 22: polygon 0 reaches x -10..20", "annotation 23: bbox", "annotation 24: polygon 0 has 4",
                 "annotation 25: bbox"):
        assert text in printed, text
    summary = json.loads(out.read_text())
    assert summary["fails_training"] is True and len(summary["problems"]) == len(result.problems)
    assert summary["instances_per_class"] == {"cat": 7, "dog": 3}  # the 4 checked new ones (21, 22, 23, 25) too


def test_problems_that_train_exit_0_unless_strict(clean):
    root, coco = clean
    first = coco["annotations"][0]
    coco["annotations"].append({**first, "id": 30, "bbox": [70, 50, 20, 15]})
    (root / "warn.json").write_text(json.dumps(coco))
    result = check_dataset(root / "warn.json", root / "lm", box_iou_threshold=0.5)
    assert [(p.kind, p.annotation_id) for p in result.problems] == [("box_mask_disagree", 30)]
    assert not result.fails_training
    argv = ["data", "check", str(root / "warn.json"), "--images", str(root / "lm")]
    assert run_cli(argv) == 0 and run_cli([*argv, "--strict"]) == 1


def test_box_that_matches_its_polygon_extent_agrees(clean):
    """A 3 x 3 px square's box: its raster box is the same pixels, its IoU 1 (a 1-px shift would give 0.5)."""
    root, coco = clean
    first = coco["annotations"][0]
    coco["annotations"].append({**first, "id": 31, "segmentation": [[10, 10, 13, 10, 13, 13, 10, 13]],
                                "bbox": [10, 10, 3, 3]})
    coco["annotations"].append({**first, "id": 32, "segmentation": [[10, 10, 13, 10, 13, 13, 10, 13]],
                                "bbox": [11, 11, 3, 3]})
    (root / "tiny.json").write_text(json.dumps(coco))
    result = check_dataset(root / "tiny.json", root / "lm", box_iou_threshold=0.7)
    assert [(p.kind, p.annotation_id) for p in result.problems] == [("box_mask_disagree", 32)]

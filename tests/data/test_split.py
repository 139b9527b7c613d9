"""`data split`: by image, deterministic for a seed whatever the records' order, complete, categories kept."""

import argparse
import json

import pytest

from maskrcnn.cli_data import add_data_parsers
from maskrcnn.data import DatasetError
from maskrcnn.data.split import split_dataset


def ten_images() -> dict:
    """Images 1..10, image i with i annotations (ids 100 i + j), two categories, info kept."""
    images = [{"id": i, "file_name": f"{i}.png", "height": 8, "width": 8} for i in range(1, 11)]
    annotations = [{"id": 100 * i + j, "image_id": i, "category_id": 1 + j % 2, "bbox": [0, 0, 2, 2],
                    "segmentation": [[0, 0, 2, 0, 2, 2]]} for i in range(1, 11) for j in range(i)]
    return {"info": {"year": 2026}, "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def write(tmp_path, data: dict):
    path = tmp_path / "all.json"
    path.write_text(json.dumps(data))
    return path


def test_split_by_image_complete_and_deterministic(tmp_path):
    data = ten_images()
    train, val = split_dataset(write(tmp_path, data), 0.2, seed=0)
    assert len(val["images"]) == 2 and len(train["images"]) == 8
    ids = [{image["id"] for image in part["images"]} for part in (train, val)]
    assert ids[0] | ids[1] == set(range(1, 11)) and not ids[0] & ids[1]
    for part, part_ids in zip((train, val), ids):
        assert {ann["image_id"] for ann in part["annotations"]} <= part_ids
        assert len(part["annotations"]) == sum(part_ids)  # image i has i annotations: all of them follow it
        assert part["categories"] == data["categories"] and part["info"] == data["info"]
    assert split_dataset(write(tmp_path, data), 0.2, seed=0) == (train, val)
    data["images"].reverse()
    data["annotations"].reverse()
    _, same_val = split_dataset(write(tmp_path, data), 0.2, seed=0)
    assert {image["id"] for image in same_val["images"]} == ids[1]  # the records' order does not matter
    val_sets = {frozenset(i["id"] for i in split_dataset(write(tmp_path, data), 0.2, s)[1]["images"])
                for s in range(5)}
    assert len(val_sets) > 1  # the seed chooses


def test_split_bounds_and_errors(tmp_path):
    path = write(tmp_path, ten_images())
    assert len(split_dataset(path, 0.01, 0)[1]["images"]) == 1  # at least one image in val
    assert len(split_dataset(path, 0.99, 0)[0]["images"]) == 1  # and one in train
    with pytest.raises(DatasetError, match=r"--val must be a fraction in \(0, 1\), got 1.5"):
        split_dataset(path, 1.5, 0)
    one = ten_images()
    one["images"] = one["images"][:1]
    with pytest.raises(DatasetError, match="1 image"):
        split_dataset(write(tmp_path, one), 0.2, 0)


def test_split_command_writes_train_and_val(tmp_path, capsys):
    path = write(tmp_path, ten_images())
    parser = argparse.ArgumentParser()
    add_data_parsers(parser.add_subparsers(dest="data_command"))
    args = parser.parse_args(["split", str(path), "--val", "0.3", "--seed", "4", "--out-dir", str(tmp_path / "s")])
    assert args.func(args) == 0
    train = json.loads((tmp_path / "s" / "train.json").read_text())
    val = json.loads((tmp_path / "s" / "val.json").read_text())
    assert (len(train["images"]), len(val["images"])) == (7, 3)
    assert "val.json: 3 images" in capsys.readouterr().out

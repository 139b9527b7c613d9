"""Bad inputs, as a hostile or careless user gives them: each is one clear error naming the file / id / config key,
found before any work starts and before anything is decoded (issue 14). Adding a case is one line in a table.

Tables: BAD_CONFIG_VALUES (dotted overrides), BAD_CONFIG_FILES (YAML files), BAD_JSON (edits of a valid COCO json),
IMAGE_FAULTS (image files and folders), CLI_CASES (whole commands: one stderr line, exit status 2).
"""

from __future__ import annotations

import gc
import json
import math
import multiprocessing
import urllib.error
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from data.datafiles import coco_dict, write_image, write_pennfudan
from PIL import Image

import maskrcnn.data.common as common
from maskrcnn.cli import main
from maskrcnn.config import ConfigError, config_to_dict, load_config
from maskrcnn.data import CocoDataset, DatasetError, PennFudanDataset, build_coco_subset, build_train_loader
from maskrcnn.data.common import read_rgb, read_size

pytestmark = pytest.mark.filterwarnings("ignore:.*degenerate box")  # coco_dict has one on purpose

# ------------------------------------------------------------------------------------------------- config

# (override, the key its error must name); "{file}" stands for an existing file.
BAD_CONFIG_VALUES = [
    ("train.lr=-0.01", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("model.transform.min_size=1400", "model.transform.min_size"),  # above the default max_size 1333
    ("train.max_iters=-5", "train.max_iters"),
    ("data.num_workers=-1", "data.num_workers"),
    ("train.log_period=0", "train.log_period"),
    ("train.num_threads=0", "train.num_threads"),
    ("train.num_threads=many", "train.num_threads"),
    ("train.device=tpu", "train.device"),
    ("train.out_dir={file}", "train.out_dir"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.steps=[300, 200]", "train.steps"),
    ("train.momentum=1.5", "train.momentum"),
    ("model.rpn.nms_thresh=0", "model.rpn.nms_thresh"),
    ("model.rpn.bg_iou_thresh=0.8", "model.rpn.bg_iou_thresh"),
    ("model.box_head.score_thresh=2", "model.box_head.score_thresh"),
    ("model.num_classes=0", "model.num_classes"),
    ("model.transform.fixed_canvas=[0, 64]", "model.transform.fixed_canvas"),
    ("data.flip_prob=-0.5", "data.flip_prob"),
    ("eval.iou_thresh=0", "eval.iou_thresh"),
]


@pytest.mark.parametrize("override, key", BAD_CONFIG_VALUES)
def test_bad_config_value_names_its_key(tmp_path, override, key):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError) as info:
        load_config(None, [override.format(file=tmp_path / "a_file")])
    assert str(info.value).startswith(key)


@pytest.mark.parametrize("other", ["model.backbone.weights=imagenet", "model.backbone.name=efficientnet_lite0"])
def test_group_norm_with_a_backbone_it_does_not_fit_names_the_key(other):
    """Found by the config check, before the model is built (where it used to end as a bare ValueError)."""
    with pytest.raises(ConfigError, match=r"^model.backbone.norm: group is for"):
        load_config(None, ["model.backbone.norm=group", other])


def alias_bomb(depth: int = 6) -> str:
    """YAML whose aliases expand to 9**depth strings (only about 10 * depth nodes in the file)."""
    levels = ["&l0 [" + ", ".join(["x"] * 9) + "]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, depth)]
    return "data:\n  root: [" + ", ".join(levels) + "]\n"


# name -> (file content, what the error says besides the file name)
BAD_CONFIG_FILES: dict[str, tuple[str | bytes, str]] = {
    "alias bomb as a value": (alias_bomb(), "aliases"),
    "over the size cap": ("# " + "x" * (1 << 20) + "\ntrain: {lr: 0.1}\n", "bytes"),
    "not UTF-8": (b"train: {lr: 0.1}  # \xff\xfe\n", "UTF-8"),
    "bad value in the file": ("train:\n  log_period: 0\n", "train.log_period"),
    "nested 20000 deep": ("train: " + "[" * 20000 + "]" * 20000 + "\n", "nested too deeply"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIG_FILES))
def test_bad_config_file_names_the_file(tmp_path, case):
    content, fragment = BAD_CONFIG_FILES[case]
    path = tmp_path / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(str(path)) and fragment in str(info.value)


# --------------------------------------------------------------------------------------------- COCO json


def edit(change: Callable[[dict], object]) -> dict:
    data = coco_dict()
    change(data)
    return data


def ann(data: dict, ann_id: int) -> dict:
    return next(a for a in data["annotations"] if a["id"] == ann_id)


def image(data: dict, image_id: int) -> dict:
    return next(i for i in data["images"] if i["id"] == image_id)


# name -> (bad json as a dict or as text, what the error must say besides the file name, the id included)
BAD_JSON: dict[str, tuple[dict | str, str]] = {
    "category_id a list": (edit(lambda d: ann(d, 10).update(category_id=[5])), "annotation 10: category_id"),
    "image id a list": (edit(lambda d: image(d, 7).update(id=[7])), "image's id must be an integer, got [7]"),
    "mixed int / str image ids": (edit(lambda d: image(d, 7).update(id="7")), "image's id must be an integer, got '7'"),
    "str annotation image_id": (edit(lambda d: ann(d, 10).update(image_id="1")), "annotation 10: image_id"),
    "category id a string": (edit(lambda d: d["categories"][0].update(id="9")), "category's id must be an integer"),
    "area a string": (edit(lambda d: ann(d, 10).update(area="big")), "annotation 10: area"),
    "area NaN": (edit(lambda d: ann(d, 10).update(area=math.nan)), "annotation 10: area"),
    "no categories": (edit(lambda d: d.update(categories=[])), "'categories' is empty"),
    "RLE size a number": (edit(lambda d: ann(d, 20)["segmentation"].update(size=128)), "annotation 20: RLE size"),
    "negative RLE counts": (edit(lambda d: ann(d, 20)["segmentation"].update(counts=[18, -3, 13, 3, 225])),
                            "annotation 20: RLE counts has a negative"),
    "RLE counts short of h*w": (edit(lambda d: ann(d, 20)["segmentation"].update(counts=[18, 3, 13, 3])),
                                "annotation 20: RLE runs add up to 37 pixels"),
    "RLE counts beyond h*w": (edit(lambda d: ann(d, 20)["segmentation"].update(counts=[18, 3, 13, 3, 9999])),
                              "annotation 20: RLE runs add up to 10036"),
    "RLE counts not numbers": (edit(lambda d: ann(d, 20)["segmentation"].update(counts=["18", 238])),
                               "annotation 20: RLE counts must be integers"),
    "compressed RLE of the wrong length": (edit(lambda d: ann(d, 11)["segmentation"].update(counts="PPYo1")),
                                           "annotation 11: RLE runs add up"),
    "compressed RLE, bad characters": (edit(lambda d: ann(d, 11)["segmentation"].update(counts="~~~~")),
                                       "annotation 11: RLE counts is not a valid compressed RLE string"),
    "compressed RLE, cut short": (edit(lambda d: ann(d, 11)["segmentation"].update(counts="P")),
                                  "annotation 11: RLE counts is not a valid compressed RLE string"),
    "polygon NaN": (edit(lambda d: ann(d, 10)["segmentation"][0].__setitem__(2, math.nan)),
                    "annotation 10: polygon 0 has a coordinate nan"),
    "polygon inf": (edit(lambda d: ann(d, 10)["segmentation"][1].__setitem__(1, math.inf)),
                    "annotation 10: polygon 1 has a coordinate inf"),
    "polygon at 1e8": (edit(lambda d: ann(d, 10)["segmentation"][0].__setitem__(0, 1e8)),
                       "annotation 10: polygon 0 reaches x 2..1e+08"),
    "polygon far outside": (edit(lambda d: ann(d, 10)["segmentation"][0].__setitem__(1, -25.0)),
                            "annotation 10: polygon 0 reaches x 2..8, y -25..8, far outside"),
    "polygon coordinate a string": (edit(lambda d: ann(d, 10)["segmentation"][0].__setitem__(0, "2")),
                                    "annotation 10: polygon 0 has a coordinate '2'"),
    "iscrowd a word": (edit(lambda d: ann(d, 10).update(iscrowd="no")), "annotation 10: iscrowd must be 0 or 1"),
    "iscrowd 2": (edit(lambda d: ann(d, 10).update(iscrowd=2)), "annotation 10: iscrowd must be 0 or 1"),
    "duplicate annotation ids": (edit(lambda d: ann(d, 11).update(id=10)), "duplicate annotation id 10"),
    "bbox with NaN": (edit(lambda d: ann(d, 10).update(bbox=[2, 2, math.nan, 6])), "annotation 10: bbox"),
    "bbox of strings": (edit(lambda d: ann(d, 10).update(bbox=["2", "2", "14", "6"])), "annotation 10: bbox"),
    "image height a string": (edit(lambda d: image(d, 7).update(height="10")), "image 7: height and width"),
    "image of 1e12 pixels": (edit(lambda d: image(d, 7).update(height=10 ** 6, width=10 ** 6)),
                             "image 7: 1000000 x 1000000 pixels is over the limit"),
    "NUL in a file name": (edit(lambda d: image(d, 7).update(file_name="c.png\0.txt")),
                           "image 7: file_name must be a non-empty string without NUL"),
    "nested 200000 deep": (json.dumps(coco_dict())[:-1] + ', "info": ' + "[" * 200000 + "]" * 200000 + "}",
                           "nested too deeply"),
}


def write_coco(root: Path, data: dict | str) -> Path:
    """images/ as `coco_dict` expects them, and `data` (a dict, or the file's text) as instances.json; returns the
    json's path."""
    images = root / "images"
    (images / "sub").mkdir(parents=True, exist_ok=True)
    write_image(images / "a.png", 20, 30, "RGB", seed=1)
    write_image(images / "sub" / "b.png", 16, 16, "L", seed=2)
    write_image(images / "c.png", 10, 12, "RGBA", seed=3)
    path = root / "instances.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize("case", list(BAD_JSON))
def test_bad_json_names_the_file_and_the_id(tmp_path, case):
    data, fragment = BAD_JSON[case]
    path = write_coco(tmp_path, data)
    with pytest.raises(DatasetError) as info:
        CocoDataset(images_dir=tmp_path / "images", annotations=path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and fragment in message, message
    assert len(message.splitlines()) == 1


def test_data_coco_subset_checks_ids_too(tmp_path):
    path = write_coco(tmp_path, BAD_JSON["category_id a list"][0])
    with pytest.raises(DatasetError, match=r"instances.json: annotation 10: category_id must be an integer"):
        build_coco_subset(path, tmp_path / "subset.json", classes={"x": {"names": ["five"]}})


# ------------------------------------------------------------------------------------------------ images


def over_our_pixel_limit(tmp_path: Path, monkeypatch) -> tuple[Callable[[], object], str]:
    write_image(tmp_path / "big.png", 20, 30)
    monkeypatch.setattr(common, "MAX_IMAGE_PIXELS", 599)
    return lambda: read_rgb(tmp_path / "big.png", 4), "big.png: 30 x 20 pixels is over the limit of 599"


def over_our_pixel_limit_header_only(tmp_path: Path, monkeypatch) -> tuple[Callable[[], object], str]:
    write_image(tmp_path / "big.png", 20, 30)
    monkeypatch.setattr(common, "MAX_IMAGE_PIXELS", 599)
    return lambda: read_size(tmp_path / "big.png", 4), "big.png: 30 x 20 pixels is over the limit of 599"


def over_pillows_bomb_limit(tmp_path: Path, monkeypatch) -> tuple[Callable[[], object], str]:
    write_image(tmp_path / "bomb.png", 20, 30)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow raises DecompressionBombError from 2x this
    return lambda: read_rgb(tmp_path / "bomb.png", 4), "bomb.png: over the limit of"


def coco_link_out_of_the_images_folder(tmp_path: Path, monkeypatch) -> tuple[Callable[[], object], str]:
    path = write_coco(tmp_path, coco_dict())
    write_image(tmp_path / "secret.png", 20, 30)
    (tmp_path / "images" / "a.png").unlink()
    (tmp_path / "images" / "a.png").symlink_to(tmp_path / "secret.png")
    dataset = CocoDataset(images_dir=tmp_path / "images", annotations=path)
    return lambda: dataset[0], "instances.json: image 1: "


def pennfudan_link_out_of_its_folder(tmp_path: Path, monkeypatch) -> tuple[Callable[[], object], str]:
    root = tmp_path / "PennFudanPed"
    write_pennfudan(root, [np.ones((4, 5), np.uint8)])
    write_image(tmp_path / "secret.png", 4, 5)
    (root / "PNGImages" / "FudanPed00001.png").unlink()
    (root / "PNGImages" / "FudanPed00001.png").symlink_to(tmp_path / "secret.png")
    dataset = PennFudanDataset(root=root, split="all")
    return lambda: dataset[0], "PennFudanPed: image 0: "


# name -> setup(tmp_path, monkeypatch) returning (the read that must fail, what its DatasetError starts with)
IMAGE_FAULTS = {
    "over MAX_IMAGE_PIXELS": over_our_pixel_limit,
    "over MAX_IMAGE_PIXELS, header read": over_our_pixel_limit_header_only,
    "over Pillow's decompression-bomb limit": over_pillows_bomb_limit,
    "COCO: a link out of the images folder": coco_link_out_of_the_images_folder,
    "Penn-Fudan: a link out of PNGImages": pennfudan_link_out_of_its_folder,
}


@pytest.mark.parametrize("case", list(IMAGE_FAULTS))
def test_image_fault_is_one_line_naming_the_file(tmp_path, monkeypatch, case):
    read, start = IMAGE_FAULTS[case](tmp_path, monkeypatch)
    with pytest.raises(DatasetError) as info:
        read()
    message = str(info.value)
    assert message.startswith(str(tmp_path)) and start in message and len(message.splitlines()) == 1, message
    if "link" in case:
        assert "secret.png, outside" in message


class _CreatesAFile:
    """Unpickling this calls open(path, "w"): the side effect a malicious pickle would have, made harmless."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_pickle_in_the_cis680_files_is_refused_not_run(tmp_path):
    from maskrcnn.data.cis680 import LABELS_FILE, CIS680Dataset

    marker = tmp_path / "payload_ran"
    labels = np.empty(2, dtype=object)
    labels[:] = [np.array([1.0]), _CreatesAFile(marker)]
    np.save(tmp_path / LABELS_FILE, labels, allow_pickle=True)
    with pytest.raises(DatasetError) as info:
        CIS680Dataset(root=tmp_path)
    assert not marker.exists()
    assert str(info.value).startswith(f"{tmp_path / LABELS_FILE}: ") and "refused" in str(info.value)


# ---------------------------------------------------------------------------------------------- commands

TINY_TRAIN = {"model": {"num_classes": 2, "backbone": {"depth": 18, "norm": "group", "fpn_channels": 32},
                        "transform": {"min_size": 32, "max_size": 32},
                        "rpn": {"anchor_sizes": [8, 16, 32, 64, 128]},
                        "box_head": {"representation_size": 16}, "mask_head": {"conv_channels": 32, "num_convs": 1}},
              "data": {"format": "synthetic", "synthetic_train_size": 2, "synthetic_val_size": 1,
                       "synthetic_image_size": [32, 32], "synthetic_num_classes": 2},
              "train": {"batch_size": 1, "max_iters": 1, "device": "cpu"}}


def tiny_config(tmp_path: Path, **sections) -> Path:
    values = {**TINY_TRAIN, **sections}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def fake_checkpoint(tmp_path: Path) -> Path:
    """Enough of a checkpoint for the checks that come before its weights are used."""
    path = tmp_path / "fake.pt"
    torch.save({"config": config_to_dict(load_config(tiny_config(tmp_path))), "model": {}}, path)
    return path


def train_with_a_file_as_out(tmp_path: Path) -> list[str]:
    (tmp_path / "taken").write_text("a file")
    return ["train", str(tiny_config(tmp_path)), "--out", str(tmp_path / "taken")]


def predict_with_a_file_as_out(tmp_path: Path) -> list[str]:
    write_image(tmp_path / "x.png", 8, 8)
    (tmp_path / "taken").write_text("a file")
    return ["predict", str(fake_checkpoint(tmp_path)), str(tmp_path / "x.png"), "--out", str(tmp_path / "taken")]


def evaluate_with_a_data_config_without_data(tmp_path: Path) -> list[str]:
    (tmp_path / "nodata.yaml").write_text("train: {lr: 0.01}\n")
    return ["evaluate", str(fake_checkpoint(tmp_path)), "--data-config", str(tmp_path / "nodata.yaml")]


def train_on_a_corrupt_image_in_a_worker(tmp_path: Path) -> list[str]:
    path = write_coco(tmp_path, coco_dict())
    (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n but cut short")
    data = {"format": "coco", "train_images": str(tmp_path / "images"), "train_annotations": str(path),
            "val_images": str(tmp_path / "images"), "val_annotations": str(path), "num_workers": 1,
            "aspect_ratio_grouping": False}
    # num_classes from the json (3 categories): the error must come from the worker, not the class check
    return ["train", str(tiny_config(tmp_path, data=data)), "--out", str(tmp_path / "run"),
            "--set", "model.num_classes=null"]


def train_with_imagenet_weights_offline(tmp_path: Path) -> list[str]:
    return ["train", str(tiny_config(tmp_path)), "--out", str(tmp_path / "run"),
            "--set", "model.backbone.norm=batch", "--set", "model.backbone.weights=imagenet"]


# name -> (argv from tmp_path, fragments the one stderr line must hold)
CLI_CASES: dict[str, tuple[Callable[[Path], list[str]], tuple[str, ...]]] = {
    "train --out is a file": (train_with_a_file_as_out, ("train.out_dir", "taken")),
    "train --set train.num_threads=0": (lambda p: ["train", str(tiny_config(p)), "--set", "train.num_threads=0"],
                                        ("tiny.yaml", "train.num_threads")),
    "train, 1e-4 rejected by a range": (lambda p: ["train", str(tiny_config(p)), "--set", "train.lr=-1e-4"],
                                        ("train.lr", "-0.0001")),
    "predict --out is a file": (predict_with_a_file_as_out, ("--out", "taken")),
    "evaluate --data-config without data": (evaluate_with_a_data_config_without_data, ("nodata.yaml", "'data'")),
    "error in a DataLoader worker": (train_on_a_corrupt_image_in_a_worker, ("a.png", "image id 1")),
    "ImageNet weights offline": (train_with_imagenet_weights_offline,
                                 ("imagenet", "internet", "model.backbone.weights: /path/to.pth")),
}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache, and every weights download fails as it does without network."""
    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_command_error_is_one_line_and_exit_status_2(tmp_path, capsys, offline, case):
    argv, fragments = CLI_CASES[case]
    argv = argv(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]  # a progress bar may come before it
    assert line.startswith("maskrcnn: error: ") and err.count("maskrcnn: error:") == 1, err
    assert "Traceback" not in err and all(fragment in line for fragment in fragments), err


def test_worker_error_unwrapped_to_the_original_message(tmp_path):
    """The DataLoader re-raises a worker's error with the worker's traceback as its message; the CLI keeps only the
    original message. The workers are gone as soon as the error is out, without waiting for the garbage collector
    (which took 5 s to shut them down)."""
    from maskrcnn.cli import describe_error

    write_coco(tmp_path, coco_dict())
    (tmp_path / "images" / "a.png").write_bytes(b"not a png")
    dataset = CocoDataset(images_dir=tmp_path / "images", annotations=tmp_path / "instances.json")
    gc.disable()
    try:
        with pytest.raises(DatasetError) as info:
            next(build_train_loader(dataset, batch_size=3, num_workers=1, aspect_ratio_grouping=False))
        assert multiprocessing.active_children() == []
    finally:
        gc.enable()
    assert "Traceback" in str(info.value)
    line, status = describe_error(info.value)
    assert status == 2 and line.startswith(f"maskrcnn: error: {tmp_path / 'images' / 'a.png'}: cannot decode image (image id 1)")
    assert "Traceback" not in line and "\n" not in line


@pytest.mark.parametrize("bug", [TypeError("a bug"), RuntimeError("a bug"), ValueError("a bug")])
def test_a_bug_is_reported_as_one_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch, bug):
    """An exception that is not a user error (here raised when a sample is read; a torch RuntimeError or a
    ValueError from inside the package alike) is not the input's fault: the line says it is a bug and how to see
    its traceback."""
    from maskrcnn.data import SyntheticShapes

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(SyntheticShapes, "__getitem__", broken)
    config = str(tiny_config(tmp_path))
    argv = ["train", config, "--out", str(tmp_path / "run")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"maskrcnn: internal error: {type(bug).__name__}: a bug (this is a bug; run again with --debug or "
                   f"MASKRCNN_DEBUG=1 for the traceback, and please report it)")
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(type(bug), match="a bug"):
            main(debug_argv)
    monkeypatch.setenv("MASKRCNN_DEBUG", "1")
    with pytest.raises(type(bug), match="a bug"):
        main(argv)


# ------------------------------------------------------------------------------------ data at the boundary


def _box_annotation(ann_id: int, image_id: int, box: list[float], crowd: int = 0) -> dict:
    x, y, w, h = box
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": crowd, "bbox": box, "area": w * h,
            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}


def _coco_set(root: Path, annotations: list[dict], sizes=((64, 64), (64, 64))) -> Path:
    """A COCO json of images 1.. of `sizes` (written as files) with `annotations` of one category "thing"."""
    root.mkdir(parents=True, exist_ok=True)
    images = []
    for image_id, (height, width) in enumerate(sizes, start=1):
        write_image(root / f"{image_id}.png", height, width, seed=image_id)
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": height, "width": width})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "thing"}]}))
    return path


def test_a_training_set_left_empty_once_crowd_regions_are_removed_names_the_file(tmp_path):
    path = _coco_set(tmp_path, [_box_annotation(1, 1, [4, 4, 20, 20], crowd=1),
                                _box_annotation(2, 2, [8, 8, 0.5, 9])])  # a crowd region and a degenerate box
    with pytest.raises(DatasetError) as info:
        CocoDataset(images_dir=tmp_path, annotations=path, drop_empty=True)
    assert str(info.value) == f"{path}: no image is left to train on: none of its 2 images has an annotation that " \
                              f"is not a crowd region (1 of them) with a box of at least 1 x 1 pixel"
    assert len(CocoDataset(images_dir=tmp_path, annotations=path, drop_empty=False)) == 2  # evaluation keeps them


def test_an_image_that_resizes_to_a_zero_side_is_named_by_its_id_in_training():
    """2 x 300 pixels at the tiny model's 64-pixel max_size resize to 0 x 64: one line with the image id (training)
    or its place in the batch, not interpolate's internal error."""
    from maskrcnn.model.transform import ImageTooThinError, ImageTransform

    transform = ImageTransform(min_size=64, max_size=64, size_divisible=32, fixed_canvas=None,
                               image_mean=(0.5, 0.5, 0.5), image_std=(0.2, 0.2, 0.2)).train()
    images = [torch.rand(3, 40, 40), torch.rand(3, 2, 300)]
    targets = [{"boxes": torch.zeros(0, 4), "image_id": 5}, {"boxes": torch.zeros(0, 4), "image_id": 17}]
    with pytest.raises(ImageTooThinError, match=r"^image id 17: 300 x 2 pixels resizes to 64 x 0 for the model"):
        transform(images, targets)
    with pytest.raises(ImageTooThinError, match=r"^image 1 of the batch: 300 x 2 pixels"):
        transform.eval()(images)
    batch, _ = transform.eval()([torch.rand(3, 40, 40), torch.rand(3, 5, 300)])  # 5 x 300 -> 1 x 64: taken
    assert batch.image_sizes.tolist() == [[64, 64], [1, 64]]


class _CountedId(int):
    """An integer id that counts the comparisons made with it: the work of checking a json's categories."""

    comparisons = 0

    def __eq__(self, other):
        _CountedId.comparisons += 1
        return int(self) == int(other)

    def __lt__(self, other):
        _CountedId.comparisons += 1
        return int(self) < int(other)

    __hash__ = int.__hash__


@pytest.mark.parametrize("read", ["dataset", "check"])
def test_a_json_with_many_categories_is_checked_in_linear_work(tmp_path, monkeypatch, read):
    """5,000 categories: the comparisons of their ids grow as K log K (sorting), not K^2 (a duplicate search by
    list.count made 25 million of them; the bound is 20 per category)."""
    from maskrcnn.data import check

    count = 5_000
    data = {"images": [], "annotations": [],
            "categories": [{"id": _CountedId(k), "name": f"c{k}"} for k in range(count, 0, -1)]}
    monkeypatch.setattr(_CountedId, "comparisons", 0)
    if read == "dataset":
        dataset = CocoDataset(images_dir=tmp_path, annotations=tmp_path / "x.json", coco_dict=data)
        assert dataset.class_names[:2] == ["c1", "c2"] and len(dataset.class_names) == count
    else:
        monkeypatch.setattr(check, "_load_json", lambda path: data)
        assert len(check.check_dataset(tmp_path / "x.json", tmp_path).categories) == count
    assert 0 < _CountedId.comparisons <= 20 * count, _CountedId.comparisons


@pytest.mark.parametrize("threshold", [math.nan, -0.1, 1.5, math.inf])
def test_a_score_threshold_outside_0_1_is_refused_through_the_api_too(tmp_path, threshold):
    """The command line refuses it in its parser; the use case behind it too (NaN would silently keep nothing)."""
    from maskrcnn.app.predict import PredictOptions, run_prediction
    from maskrcnn.errors import UserError

    with pytest.raises(UserError, match=f"--score-thresh {threshold}: must be a number between 0 and 1"):
        run_prediction(tmp_path / "none.pt", [str(tmp_path)], tmp_path / "out",
                       options=PredictOptions(score_thresh=threshold))
    assert not (tmp_path / "out").exists()


def test_predict_on_a_folder_holding_a_named_pipe_does_not_hang(tiny_run, tmp_path, capsys):
    """In a process of its own, with a deadline: a named pipe (opened for reading, it blocks until a writer comes)
    in a folder is skipped and listed, the image beside it predicted; named on the command line it is one line."""
    import os
    import subprocess
    import sys

    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "good.png", 40, 48)
    os.mkfifo(folder / "pipe.png")
    command = [sys.executable, "-m", "maskrcnn", "predict", str(tiny_run / "last.pt"), "--out", str(tmp_path / "p"),
               "--no-overlays"]
    done = subprocess.run([*command, str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{folder / 'pipe.png'} (a named pipe)" in done.stderr
    records = json.loads((tmp_path / "p" / "images.json").read_text())
    assert [Path(r["file_name"]).name for r in records] == ["good.png"] and "error" not in records[0]
    assert main([*command[3:], str(folder / "pipe.png")]) == 2  # refused before anything is opened: in-process
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"maskrcnn: error: {folder / 'pipe.png'}: a named pipe, ")


def test_degenerate_boxes_dropped_for_training_do_not_break_the_report(tmp_path, capsys, tiny_values):
    """Boxes under a pixel, of zero size, outside the image or on its border, in the training and the validation
    json: training drops them (with a warning), the run ends with status 0 and writes its report."""
    annotations = [_box_annotation(1, 1, [4, 4, 20, 20]), _box_annotation(2, 2, [10, 10, 30, 20]),
                   _box_annotation(3, 2, [40, 40, 0.4, 10]), _box_annotation(4, 2, [70, 70, 5, 5]),
                   _box_annotation(5, 1, [10, 10, 0, 0]), _box_annotation(6, 1, [63.5, 20, 3, 3])]
    path = _coco_set(tmp_path / "data", annotations)
    data = {"format": "coco", "train_images": str(path.parent), "train_annotations": str(path),
            "val_images": str(path.parent), "val_annotations": str(path)}
    values = {**tiny_values, "data": data, "model": {**tiny_values["model"], "num_classes": 1},
              "train": {**tiny_values["train"], "max_iters": 2}, "eval": {"batch_size": 2, "num_vis": 2}}
    config = tmp_path / "coco.yaml"
    config.write_text(yaml.safe_dump(values))
    with pytest.warns(UserWarning, match="degenerate box"):
        assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "report.html").is_file()

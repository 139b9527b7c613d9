"""Annotations of LabelMe, YOLO segmentation, Pascal VOC and CVAT converted to COCO: the same classes, the sizes of
the image files, masks within IoU 0.99 of the source rasterised independently (formatfiles.py), and one-line
errors naming the file and the entry for broken inputs."""

import argparse
import base64
import io
import json
from pathlib import Path

import formatfiles as ff
import numpy as np
import pycocotools.mask as mask_utils
import pytest
import yaml
from PIL import Image

from maskrcnn.data import DatasetError, build_dataset
from maskrcnn.data.formats import convert_source
from maskrcnn.data.formats.builder import ellipse_polygon


def decoded(ann: dict, image: dict) -> np.ndarray:
    segmentation = ann["segmentation"]
    if isinstance(segmentation, list):
        segmentation = mask_utils.merge(mask_utils.frPyObjects(segmentation, image["height"], image["width"]))
    return mask_utils.decode(segmentation).astype(bool)


def assert_matches(coco: dict, expected: list[tuple[str, str, np.ndarray]]) -> None:
    """Every converted instance is the expected one (file, class, mask IoU >= 0.99), bbox and area from the mask."""
    images = {image["id"]: image for image in coco["images"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert len(coco["annotations"]) == len(expected)
    for ann, (file_name, name, mask) in zip(coco["annotations"], expected):
        image = images[ann["image_id"]]
        assert (image["file_name"], names[ann["category_id"]]) == (file_name, name)
        got = decoded(ann, image)
        assert (got & mask).sum() / (got | mask).sum() >= 0.99, (file_name, name)
        ys, xs = np.nonzero(got)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        assert ann["area"] == got.sum() and ann["iscrowd"] == 0


def test_labelme_polygon_rectangle_circle_group_and_mask(tmp_path):
    expected = ff.write_labelme(tmp_path)
    conversion = convert_source("labelme", tmp_path)
    coco = conversion.coco
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "cat"), (2, "dog")]  # the line's label is none
    assert [(i["file_name"], i["height"], i["width"]) for i in coco["images"]] == [
        ("a.png", ff.H, ff.W), ("b.png", ff.H, ff.W), ("c.png", ff.H, ff.W)]
    assert_matches(coco, expected)
    assert conversion.skipped == {"line": 1} and conversion.images_dir == tmp_path
    assert len(coco["annotations"][3]["segmentation"]) == 2  # the group: one instance of two polygons
    assert isinstance(coco["annotations"][4]["segmentation"], dict)  # the mask: RLE, its hole kept
    assert not decoded(coco["annotations"][4], coco["images"][0])[30 + 9, 40 + 11]


def test_labelme_labels_file_orders_the_classes(tmp_path):
    ff.write_labelme(tmp_path)
    (tmp_path / "labels.txt").write_text("__ignore__\n_background_\ndog\nbird\ncat\nperson\n")
    coco = convert_source("labelme", tmp_path).coco
    assert [c["name"] for c in coco["categories"]] == ["dog", "bird", "cat", "person"]
    assert [a["category_id"] for a in coco["annotations"]] == [3, 1, 3, 1, 3, 1]


def test_labelme_image_sizes_come_from_the_files(tmp_path):
    ff.write_labelme(tmp_path)
    ff.write_photo(tmp_path / "c.png", height=30, width=40)
    record = json.loads((tmp_path / "c.json").read_text())
    del record["imageHeight"], record["imageWidth"]  # the file says 40 x 30; nothing to compare with
    (tmp_path / "c.json").write_text(json.dumps(record))
    image = convert_source("labelme", tmp_path).coco["images"][2]
    assert (image["height"], image["width"]) == (30, 40)


def test_yolo_seg_yaml_splits_names_and_box_lines(tmp_path):
    expected = ff.write_yolo_seg(tmp_path)
    coco = convert_source("yolo-seg", tmp_path / "data.yaml").coco
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "cat"), (2, "dog")]
    assert [i["file_name"] for i in coco["images"]] == ["images/train/x.png", "images/train/y.png"]  # y: no labels
    assert_matches(coco, expected)
    val = convert_source("yolo-seg", tmp_path / "data.yaml", split="val").coco
    assert [i["file_name"] for i in val["images"]] == ["images/val/z.png"]
    assert_matches(val, [("images/val/z.png", "cat", ff.polygon_mask(ff.PART_A))])


def test_yolo_seg_names_as_list_and_folder_with_class_list(tmp_path):
    expected = ff.write_yolo_seg(tmp_path, names=["cat", "dog"])
    assert_matches(convert_source("yolo-seg", tmp_path / "data.yaml").coco, expected)
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    coco = convert_source("yolo-seg", tmp_path).coco  # the folder: every image under images/
    assert [i["file_name"] for i in coco["images"]] == ["images/train/x.png", "images/train/y.png",
                                                        "images/val/z.png"]
    assert len(coco["annotations"]) == 4


def test_yolo_seg_split_as_a_list_of_images(tmp_path):
    """A split given as a .txt list (paths relative to the list's folder) and as a list of entries."""
    expected = ff.write_yolo_seg(tmp_path)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("../images/train/x.png\n")
    data = yaml.safe_load((tmp_path / "data.yaml").read_text())
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({**data, "train": ["lists/train.txt", "images/val"]}))
    coco = convert_source("yolo-seg", tmp_path / "data.yaml").coco
    assert [i["file_name"] for i in coco["images"]] == ["images/train/x.png", "images/val/z.png"]
    assert_matches(coco, [*expected, ("images/val/z.png", "cat", ff.polygon_mask(ff.PART_A))])


@pytest.mark.parametrize("rgb", [False, True], ids=["palette", "colour-map"])
def test_voc_objects_classes_and_void_border(tmp_path, rgb):
    expected = ff.write_voc(tmp_path, rgb=rgb)
    coco = convert_source("voc", tmp_path).coco
    assert [c["name"] for c in coco["categories"]] == list(ff_voc_names())
    assert [c["id"] for c in coco["categories"]] == list(range(1, 21))
    assert_matches(coco, expected)
    for ann, (_, _, mask) in zip(coco["annotations"], expected):
        assert np.array_equal(decoded(ann, coco["images"][0]), mask)  # pixels exactly, the void border in none
    train = convert_source("voc", tmp_path, split="train").coco
    assert [i["file_name"] for i in train["images"]] == ["JPEGImages/2007_000001.jpg"]


def ff_voc_names() -> tuple[str, ...]:
    from maskrcnn.data.formats.voc import VOC_CLASSES

    assert VOC_CLASSES[8] == "cat" and VOC_CLASSES[12] == "dog" and VOC_CLASSES[15] == "person"
    return VOC_CLASSES[1:]


def test_voc_labelmap_names_and_colours(tmp_path):
    ff.write_voc(tmp_path, rgb=True)
    # CVAT / Datumaro's labelmap: the file's colours are VOC's for indices 0, 8, 12, 15, renamed
    palette = ff.voc_palette()
    rows = [f"{name}:{','.join(map(str, palette[3 * i:3 * i + 3]))}::" for name, i in
            (("background", 0), ("kitty", 8), ("doggo", 12), ("human", 15))]
    (tmp_path / "labelmap.txt").write_text("# label:color_rgb:parts:actions\n" + "\n".join(rows) + "\n")
    coco = convert_source("voc", tmp_path).coco
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "kitty"), (2, "doggo"), (3, "human")]
    assert [a["category_id"] for a in coco["annotations"]] == [1, 2, 3]


def test_cvat_box_polygon_mask_ellipse_and_group(tmp_path):
    expected = ff.write_cvat(tmp_path)
    conversion = convert_source("cvat", tmp_path / "annotations.xml")
    coco = conversion.coco
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "cat"), (2, "dog"), (3, "bird")]
    assert [i["file_name"] for i in coco["images"]] == ["f1.png", "f2.png"]
    assert conversion.images_dir == tmp_path / "images" and conversion.skipped == {"polyline": 1}
    assert_matches(coco, expected)


def test_cvat_subset_and_images_folder(tmp_path):
    ff.write_cvat(tmp_path / "task")
    xml = tmp_path / "task" / "annotations.xml"
    xml.write_text(xml.read_text().replace('name="f2.png"', 'name="f2.png" subset="val"'))
    coco = convert_source("cvat", xml, split="val", images_dir=tmp_path / "task" / "images").coco
    assert [i["file_name"] for i in coco["images"]] == ["f2.png"] and coco["annotations"] == []


def test_ellipse_polygon_keeps_the_area():
    polygon = ellipse_polygon(50.0, 40.0, 30.0, 10.0, 30.0)
    xs, ys = np.array(polygon[0::2]), np.array(polygon[1::2])
    area = abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))) / 2
    assert area == pytest.approx(np.pi * 30 * 10, rel=1e-9)
    # turned 30 degrees clockwise on screen (y down): the long axis's end lies along (cos 30, sin 30) from the centre
    direction = np.array([xs[0] - 50.0, ys[0] - 40.0])
    assert direction / np.linalg.norm(direction) == pytest.approx([np.cos(np.pi / 6), np.sin(np.pi / 6)])
    assert np.linalg.norm(direction) == pytest.approx(30.0, rel=0.01)


def test_polygons_outside_the_image_become_clipped_rle(tmp_path):
    ff.write_labelme(tmp_path)
    record = json.loads((tmp_path / "b.json").read_text())
    record["shapes"] = [ff.labelme_shape("dog", [[-20.0, -20.0], [40.0, -20.0], [40.0, 30.0], [-20.0, 30.0]])]
    (tmp_path / "b.json").write_text(json.dumps(record))
    ann = convert_source("labelme", tmp_path).coco["annotations"][-1]
    assert isinstance(ann["segmentation"], dict) and ann["bbox"] == [0, 0, 40, 30] and ann["area"] == 1200


# ------------------------------------------------------------------------------------------ broken inputs


def edit_json(path: Path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def set_shape(index: int, **values):
    return lambda record: record["shapes"][index].update(values)


LABELME_BREAKS = {
    "two-point polygon": ("a.json", set_shape(0, points=[[1, 1], [5, 5]]), "a.json: shape 0: a polygon needs at least 3"),
    "unknown shape type": ("a.json", set_shape(1, shape_type="blob"), "a.json: shape 1: unknown shape_type 'blob'"),
    "nan point": ("a.json", set_shape(2, points=[[1, 1], [float("nan"), 2]]), "a.json: shape 2: 'points'"),
    "bad mask": ("a.json", set_shape(6, mask="not base64!"), "a.json: shape 6: 'mask' is not a base64 PNG"),
    "no label": ("b.json", set_shape(0, label=""), "b.json: shape 0: needs a non-empty string 'label'"),
    "size differs": ("b.json", lambda r: r.update(imageWidth=50), "b.json: says the image is 50 x 72"),
    "missing image": ("b.json", lambda r: r.update(imagePath="gone.png"), "gone.png: image file not found"),
    "bad group": ("a.json", set_shape(3, group_id="x"), "a.json: shape 3: group_id must be an integer"),
}


@pytest.mark.parametrize("name", list(LABELME_BREAKS))
def test_broken_labelme_is_one_line_naming_file_and_shape(tmp_path, name):
    ff.write_labelme(tmp_path)
    file, change, message = LABELME_BREAKS[name]
    edit_json(tmp_path / file, change)
    with pytest.raises(DatasetError) as error:
        convert_source("labelme", tmp_path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_labelme_invalid_json_and_unknown_label(tmp_path):
    ff.write_labelme(tmp_path)
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"c\.json: not valid JSON"):
        convert_source("labelme", tmp_path)
    (tmp_path / "c.json").write_text(json.dumps(ff.labelme_file("c.png", [])))
    (tmp_path / "labels.txt").write_text("cat\n")
    with pytest.raises(DatasetError, match=r"a\.json: shape 1: label 'dog' is not in .*labels\.txt"):
        convert_source("labelme", tmp_path)


YOLO_BREAKS = {
    "unknown class": ("5 0.1 0.1 0.2 0.1 0.2 0.2", "x.txt:2: class 5 is not one of the 2 classes"),
    "odd coordinates": ("0 0.1 0.1 0.2 0.1 0.2", "x.txt:2: 5 coordinates"),
    "not normalised": ("0 10 10 20 10 20 20", "x.txt:2: coordinates must be normalised"),
    "not numbers": ("0 a b c d e f", "x.txt:2: not numbers"),
}


@pytest.mark.parametrize("name", list(YOLO_BREAKS))
def test_broken_yolo_line_is_named_by_file_and_line(tmp_path, name):
    ff.write_yolo_seg(tmp_path)
    line, message = YOLO_BREAKS[name]
    labels = tmp_path / "labels/train/x.txt"
    first, *rest = labels.read_text().splitlines()
    labels.write_text("\n".join([first, line, *rest]) + "\n")
    with pytest.raises(DatasetError) as error:
        convert_source("yolo-seg", tmp_path / "data.yaml")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_broken_yolo_yaml(tmp_path):
    ff.write_yolo_seg(tmp_path)
    data = yaml.safe_load((tmp_path / "data.yaml").read_text())
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({**data, "names": "cat"}))
    with pytest.raises(DatasetError, match=r"data\.yaml: 'names' must be a list"):
        convert_source("yolo-seg", tmp_path / "data.yaml")
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({**data, "val": "images/nope"}))
    with pytest.raises(DatasetError, match=r"data\.yaml: 'val' entry 'images/nope'.* neither a folder"):
        convert_source("yolo-seg", tmp_path / "data.yaml", split="val")
    with pytest.raises(DatasetError, match=r"data\.yaml: no 'test' entry"):
        convert_source("yolo-seg", tmp_path / "data.yaml", split="test")


def test_broken_voc(tmp_path):
    ff.write_voc(tmp_path)
    classes = tmp_path / "SegmentationClass/2007_000002.png"
    values = np.array(Image.open(classes))
    values[10, 60] = 3  # one pixel of the person (object 1) marked bird
    png = Image.fromarray(values, "P")
    png.putpalette(ff.voc_palette())
    png.save(classes)
    with pytest.raises(DatasetError, match=r"SegmentationObject/2007_000002\.png: object 1 covers class index"):
        convert_source("voc", tmp_path)
    with pytest.raises(DatasetError, match=r"ImageSets/Segmentation/test\.txt: split list not found"):
        convert_source("voc", tmp_path, split="test")
    Image.new("P", (10, 10)).save(classes)
    with pytest.raises(DatasetError, match=r"2007_000002\.png: 10 x 10 pixels but its image .* is 96 x 72"):
        convert_source("voc", tmp_path)


def test_voc_colour_outside_the_map(tmp_path):
    ff.write_voc(tmp_path, rgb=True)
    objects = tmp_path / "SegmentationObject/2007_000001.png"
    pixels = np.array(Image.open(objects))
    pixels[0, 0] = (1, 2, 3)
    Image.fromarray(pixels).save(objects)
    with pytest.raises(DatasetError, match=r"2007_000001\.png: colour\(s\) \(1, 2, 3\) are in no instance colour map"):
        convert_source("voc", tmp_path)


CVAT_BREAKS = {
    "runs do not add up": ('width="24" height="20"', 'width="24" height="21"', "image 0 (f1.png): mask 2: rle runs"),
    "unknown label": ('<ellipse label="dog"', '<ellipse label="cow"', "image 0 (f1.png): ellipse 3: label 'cow'"),
    "bad points": ('points="1.00,1.00;20.00,20.00"></polyline>',
                   'points="1,1"></polyline><polygon label="dog" points="1,1;2"></polygon>',
                   "image 0 (f1.png): polygon 5: points must be"),
    "size differs": (f'name="f2.png" width="{ff.W}"', 'name="f2.png" width="50"', "image 1: says the image is 50"),
    "missing image": ('name="f2.png"', 'name="f3.png"', "f3.png: image file not found"),
    "video": ("</annotations>", '<track id="0" label="cat"></track></annotations>', "CVAT for video"),
    "not xml": ("</annotations>", "", "not valid XML"),
}


@pytest.mark.parametrize("name", list(CVAT_BREAKS))
def test_broken_cvat_is_one_line_naming_image_and_shape(tmp_path, name):
    ff.write_cvat(tmp_path)
    old, new, message = CVAT_BREAKS[name]
    xml = tmp_path / "annotations.xml"
    assert old in xml.read_text()
    xml.write_text(xml.read_text().replace(old, new))
    with pytest.raises(DatasetError) as error:
        convert_source("cvat", xml)
    assert message in str(error.value) and "annotations.xml" in str(error.value)
    assert "\n" not in str(error.value)


def test_labelme_mask_patch_is_pasted_at_its_corner(tmp_path):
    """A 2 x 3 patch at (5, 4): pixels x 5..7, y 4..5, read back exactly."""
    ff.write_labelme(tmp_path)
    buffer = io.BytesIO()
    Image.fromarray(np.full((2, 3), 255, np.uint8)).save(buffer, format="PNG")
    shape = ff.labelme_shape("cat", [[5.0, 4.0], [7.0, 5.0]], "mask", mask=base64.b64encode(buffer.getvalue()).decode())
    edit_json(tmp_path / "c.json", lambda r: r["shapes"].append(shape))
    coco = convert_source("labelme", tmp_path).coco
    assert coco["annotations"][-1]["bbox"] == [5, 4, 3, 2] and coco["annotations"][-1]["area"] == 6


# ------------------------------------------------------------------------------------------ data.format


def test_config_names_a_labelme_folder(tmp_path, tiny_config):
    ff.write_labelme(tmp_path / "lm")
    cfg = tiny_config(tmp_path / "run", "data.format=labelme", f"data.train_annotations={tmp_path / 'lm'}",
                      f"data.val_annotations={tmp_path / 'lm'}")
    train, val = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    assert train.class_names == ["cat", "dog"] and len(train) == 2 and len(val) == 3  # train drops the empty c.png
    image, target = val[0]
    assert image.shape == (3, ff.H, ff.W) and target["labels"].tolist() == [1, 2, 1, 2, 1]


def test_config_names_a_yolo_yaml_by_root(tmp_path, tiny_config):
    ff.write_yolo_seg(tmp_path)
    cfg = tiny_config(tmp_path / "run", "data.format=yolo-seg", f"data.root={tmp_path / 'data.yaml'}")
    assert len(build_dataset(cfg.data, "train")) == 1 and len(build_dataset(cfg.data, "val")) == 1
    with pytest.raises(DatasetError, match="data.train_annotations is not set: data.format=cvat"):
        build_dataset(tiny_config(tmp_path / "run", "data.format=cvat").data, "train")


def test_converted_labelme_set_trains_in_one_command(tmp_path, tiny_yaml):
    """`data convert --from labelme` then `train` on the json: 2 iterations of the tiny model, evaluated."""
    from maskrcnn.cli import main
    from maskrcnn.cli_data import cmd_data_convert

    ff.write_labelme(tmp_path / "lm")
    out = tmp_path / "train.json"
    args = argparse.Namespace(source_format="labelme", src=str(tmp_path / "lm"), out=str(out), split=None,
                              images=None)
    assert cmd_data_convert(args) == 0
    sets = [f"data.{key}={value}" for key, value in (("format", "coco"), ("train_images", tmp_path / "lm"),
                                                     ("train_annotations", out), ("val_images", tmp_path / "lm"),
                                                     ("val_annotations", out))]
    argv = ["train", str(tiny_yaml), "--out", str(tmp_path / "run")]
    for item in [*sets, "train.max_iters=2", "train.warmup_iters=1"]:
        argv += ["--set", item]
    assert main(argv) == 0
    import torch

    state = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert state["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert (tmp_path / "run" / "metrics.json").is_file()  # evaluated on the converted images

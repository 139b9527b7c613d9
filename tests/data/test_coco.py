import json
import warnings
from pathlib import Path

import pytest
import torch
from datafiles import coco_dict, rle_block_mask, write_image

from maskrcnn.data import DatasetError
from maskrcnn.data.coco import CocoDataset, build_coco_subset, read_coco_index


def make(coco_dir: Path, **kwargs) -> CocoDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CocoDataset(images_dir=coco_dir / "images", annotations=coco_dir / "instances.json", **kwargs)


def test_labels_are_contiguous_in_sorted_category_id_order(coco_dir):
    dataset = make(coco_dir)
    assert dataset.class_names == ["three", "five", "nine"]
    assert dataset.label_to_category_id == {1: 3, 2: 5, 3: 9}
    assert dataset.image_ids == [1, 2, 7]


def test_polygon_and_compressed_rle_and_crowd_left_out(coco_dir):
    image, target = make(coco_dir)[0]
    assert image.shape == (3, 20, 30) and image.dtype == torch.uint8
    assert target["image_id"] == 1
    assert target["labels"].tolist() == [2, 1]  # category 5 -> 2, category 3 -> 1; the crowd one is left out
    assert target["boxes"].tolist() == [[2, 2, 16, 8], [20, 10, 28, 15]]  # xywh -> xyxy
    masks = target["masks"]
    assert masks.shape == (2, 20, 30) and masks.dtype == torch.uint8
    polygon = masks[0]
    assert polygon[4, 4] == 1 and polygon[4, 14] == 1  # inside each of the two parts
    assert polygon[4, 10] == 0 and polygon[15, 25] == 0  # between the parts, far away
    assert polygon[:, 17:].sum() == 0 and polygon[10:].sum() == 0
    assert torch.equal(masks[1], torch.from_numpy(rle_block_mask()))


def test_uncompressed_rle_grayscale_image_and_degenerate_box(coco_dir):
    with pytest.warns(UserWarning, match="dropped 1 degenerate box") as record:
        dataset = CocoDataset(images_dir=coco_dir / "images", annotations=coco_dir / "instances.json")
    assert len(record) == 1
    image, target = dataset[1]
    assert image.shape == (3, 16, 16)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # gray -> RGB
    assert target["labels"].tolist() == [3]
    assert target["boxes"].tolist() == [[1, 2, 3, 5]]
    expected = torch.zeros(16, 16, dtype=torch.uint8)
    expected[2:5, 1:3] = 1
    assert torch.equal(target["masks"][0], expected)


def test_empty_image_kept_or_dropped(coco_dir):
    image, target = make(coco_dir)[2]
    assert image.shape == (3, 10, 12)  # RGBA -> RGB
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 10, 12)
    assert make(coco_dir, drop_empty=True).image_ids == [1, 2]


def test_coco_object_keeps_crowd_and_fills_missing_fields(coco_dir):
    coco = make(coco_dir).coco
    assert sorted(coco.getImgIds()) == [1, 2, 7]
    assert coco.getAnnIds(imgIds=[1], iscrowd=True) == [12]
    assert coco.anns[20]["iscrowd"] == 0
    assert coco.anns[20]["area"] == 6  # from the RLE: 2 columns x 3 rows


def test_image_size_does_not_read_the_file(coco_dir):
    dataset = make(coco_dir)
    (coco_dir / "images" / "a.png").unlink()
    assert dataset.image_size(0) == (20, 30)


def write_json(coco_dir: Path, data: dict) -> None:
    (coco_dir / "instances.json").write_text(json.dumps(data))


def edit(change):
    data = coco_dict()
    change(data)
    return data


BAD_JSON = {
    "missing key": (edit(lambda d: d.pop("categories")), "missing required key 'categories'"),
    "image without file_name": (edit(lambda d: d["images"][1].pop("file_name")), "image 2 is missing"),
    "annotation without bbox": (edit(lambda d: d["annotations"][0].pop("bbox")), r"annotation 10 is missing.*bbox"),
    "unknown image": (edit(lambda d: d["annotations"][1].update(image_id=99)),
                      "annotation 11 points to unknown image id 99"),
    "unknown category": (edit(lambda d: d["annotations"][1].update(category_id=4)),
                         "annotation 11 has unknown category id 4"),
    "two-point polygon": (edit(lambda d: d["annotations"][0].update(segmentation=[[1, 1, 5, 5]])),
                          "annotation 10: polygon 0 has 4 coordinates; a polygon needs at least 3 points"),
    "rle size": (edit(lambda d: d["annotations"][3]["segmentation"].update(size=[16, 17])),
                 r"annotation 20: RLE size \[16, 17\] differs"),
    "parent dir": (edit(lambda d: d["images"][0].update(file_name="../x.jpg")),
                   "image 1: file_name '../x.jpg' escapes"),
    "nested parent dir": (edit(lambda d: d["images"][0].update(file_name="sub/../../x.jpg")),
                          "image 1: file_name 'sub/../../x.jpg' escapes"),
    "absolute": (edit(lambda d: d["images"][0].update(file_name="/etc/x.jpg")),
                 "image 1: file_name '/etc/x.jpg' escapes"),
}


@pytest.mark.parametrize("case", list(BAD_JSON))
def test_bad_json_names_file_and_id(coco_dir, case):
    data, message = BAD_JSON[case]
    write_json(coco_dir, data)
    with pytest.raises(DatasetError, match=message) as info:
        make(coco_dir)
    assert "instances.json" in str(info.value)


def test_not_json_and_missing_json(coco_dir):
    (coco_dir / "instances.json").write_text("{not json")
    with pytest.raises(DatasetError, match="instances.json: not valid JSON"):
        make(coco_dir)
    with pytest.raises(DatasetError, match="nope.json: annotation file not found"):
        CocoDataset(images_dir=coco_dir, annotations=coco_dir / "nope.json")


def test_missing_corrupt_and_wrong_size_images(coco_dir):
    dataset = make(coco_dir)
    (coco_dir / "images" / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"a.png: image file not found \(image id 1\)"):
        dataset[0]
    (coco_dir / "images" / "sub" / "b.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"b.png: cannot decode image \(image id 2\)"):
        dataset[1]
    write_image(coco_dir / "images" / "c.png", 11, 12)
    with pytest.raises(DatasetError, match=r"c.png: image 7 decodes to \(h, w\) \(11, 12\)"):
        dataset[2]


def subset_source() -> dict:
    def ann(ann_id, image_id, category_id, crowd=0):
        return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": crowd, "area": 4.0,
                "bbox": [0, 0, 2, 2], "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]}

    return {
        "info": {"description": "tiny"},
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": 4, "width": 4} for i in (1, 2, 3, 4)],
        "categories": [
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 3, "name": "car", "supercategory": "vehicle"},
            {"id": 6, "name": "bus", "supercategory": "vehicle"},
            {"id": 18, "name": "dog", "supercategory": "animal"},
            {"id": 62, "name": "chair", "supercategory": "furniture"},
        ],
        "annotations": [ann(1, 1, 3), ann(2, 1, 1), ann(3, 2, 6), ann(4, 2, 62), ann(5, 3, 62), ann(6, 4, 18, crowd=1)],
    }


def test_coco_subset_merges_categories_and_drops_images_without_kept_annotations(tmp_path):
    source = tmp_path / "instances_train.json"
    source.write_text(json.dumps(subset_source()))
    out = tmp_path / "out" / "subset.json"
    summary = build_coco_subset(source, out)
    assert summary == {"images": 3, "annotations": 4, "crowd_annotations": 1,
                       "annotations_per_class": {"vehicles": 2, "people": 1, "animals": 1}}
    written = json.loads(out.read_text())
    assert written["categories"] == [{"id": 1, "name": "vehicles", "supercategory": "vehicles"},
                                     {"id": 2, "name": "people", "supercategory": "people"},
                                     {"id": 3, "name": "animals", "supercategory": "animals"}]
    assert [(a["id"], a["category_id"]) for a in written["annotations"]] == [(1, 1), (2, 2), (3, 1), (6, 3)]
    assert [image["id"] for image in written["images"]] == [1, 2, 4]  # image 3 has only a chair; 4 a crowd dog
    assert written["info"] == {"description": "tiny"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["subset.json"]  # no temporary file left behind


def test_coco_subset_custom_classes_and_errors(tmp_path):
    source = tmp_path / "instances.json"
    source.write_text(json.dumps(subset_source()))
    build_coco_subset(source, tmp_path / "s.json", classes={"seat": {"names": ["chair"]}})
    written = json.loads((tmp_path / "s.json").read_text())
    assert [(a["id"], a["category_id"]) for a in written["annotations"]] == [(4, 1), (5, 1)]
    assert written["categories"] == [{"id": 1, "name": "seat", "supercategory": "seat"}]
    with pytest.raises(DatasetError, match="class 'boats' matches no category"):
        build_coco_subset(source, tmp_path / "s.json", classes={"boats": {"names": ["boat"]}})
    with pytest.raises(DatasetError, match="'car' is matched by two classes"):
        build_coco_subset(source, tmp_path / "s.json",
                          classes={"a": {"supercategories": ["vehicle"]}, "b": {"names": ["car"]}})
    with pytest.raises(DatasetError, match="give 'supercategories' and/or 'names'"):
        build_coco_subset(source, tmp_path / "s.json", classes={"a": {"supercategory": ["vehicle"]}})


def test_iscrowd_strings_0_and_1_are_read_as_numbers(coco_dir):
    data = coco_dict()
    for ann in data["annotations"]:
        if ann["id"] in (10, 12):
            ann["iscrowd"] = {10: "0", 12: "1"}[ann["id"]]
    (coco_dir / "instances.json").write_text(json.dumps(data))
    dataset = make(coco_dir)
    assert dataset[0][1]["labels"].tolist() == [2, 1]  # annotation 10 trains ("0" is not crowd), 12 does not
    assert dataset.coco.anns[10]["iscrowd"] == 0 and dataset.coco.anns[12]["iscrowd"] == 1
    assert dataset.coco.getAnnIds(imgIds=[1], iscrowd=True) == [12]


def test_a_link_inside_the_images_folder_is_followed(coco_dir):
    images = coco_dir / "images"
    (images / "a.png").rename(images / "sub" / "real_a.png")
    (images / "a.png").symlink_to(images / "sub" / "real_a.png")
    assert make(coco_dir)[0][0].shape == (3, 20, 30)


def test_read_coco_index_gives_label_order_and_file_ids(coco_dir, tmp_path):
    categories, image_ids = read_coco_index(coco_dir / "instances.json")
    assert categories == [{"id": 3, "name": "three"}, {"id": 5, "name": "five"}, {"id": 9, "name": "nine"}]
    assert image_ids == {"a.png": 1, "sub/b.png": 2, "c.png": 7}
    info = tmp_path / "image_info.json"  # an image-info json (COCO test-dev): no annotations, no categories
    info.write_text(json.dumps({"images": [{"id": 4, "file_name": "d.jpg", "height": 2, "width": 3}]}))
    assert read_coco_index(info) == ([], {"d.jpg": 4})
    info.write_text(json.dumps({"images": [{"id": 4}]}))
    with pytest.raises(DatasetError, match="image 4 is missing required key"):
        read_coco_index(info)

import pytest
import torch
from datafiles import pennfudan_masks, write_pennfudan

from maskrcnn.config import DataConfig
from maskrcnn.data import (
    CocoDataset,
    DatasetError,
    PennFudanDataset,
    RandomHorizontalFlip,
    SyntheticShapes,
    build_dataset,
)


def test_synthetic_train_flips_and_val_does_not():
    cfg = DataConfig(synthetic_train_size=4, synthetic_val_size=3, synthetic_image_size=(32, 48), flip_prob=1.0)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert isinstance(train, SyntheticShapes) and len(train) == 4 and len(val) == 3
    assert isinstance(train.transform, RandomHorizontalFlip) and val.transform is None
    plain = SyntheticShapes(num_images=4, image_size=(32, 48), seed=0)
    assert torch.equal(train[1][0], plain[1][0].flip(-1))
    assert not torch.equal(val[1][0], plain[1][0])  # the val stream differs from the train stream


def test_coco_val_keeps_empty_images_and_train_drops_them(coco_dir):
    cfg = DataConfig(format="coco", train_images=str(coco_dir / "images"),
                     train_annotations=str(coco_dir / "instances.json"), val_images=str(coco_dir / "images"),
                     val_annotations=str(coco_dir / "instances.json"), drop_empty=True)
    with pytest.warns(UserWarning):
        train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert isinstance(train, CocoDataset)
    assert train.image_ids == [1, 2] and val.image_ids == [1, 2, 7]
    with pytest.raises(DatasetError, match="data.val_images is not set: .*--set data.val_images=DIR"):
        build_dataset(DataConfig(format="coco"), "val")


def test_pennfudan_and_cis680_from_config(tmp_path):
    write_pennfudan(tmp_path / "pf", pennfudan_masks())
    dataset = build_dataset(DataConfig(format="pennfudan", root=str(tmp_path / "pf"), num_val=1), "val")
    assert isinstance(dataset, PennFudanDataset) and len(dataset) == 1
    with pytest.raises(DatasetError, match="data.root is not set: .*--set data.root=DIR"):
        build_dataset(DataConfig(format="cis680"), "train")
    with pytest.raises(ValueError, match="split must be"):
        build_dataset(DataConfig(), "test")

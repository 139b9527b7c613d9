import pickle

import h5py
import numpy as np
import pytest
import torch

from maskrcnn.data import DatasetError
from maskrcnn.data.cis680 import BOXES_FILE, IMAGES_FILE, LABELS_FILE, MASKS_FILE, CIS680Dataset


def object_array(entries):
    array = np.empty(len(entries), dtype=object)
    array[:] = entries
    return array


def write_cis680(root, *, masks=None, labels=None):
    """Three 6x8 images: image 0 with two objects, image 1 with none, image 2 with one object and a degenerate box.
    Masks are float (0.3 / 0.7) like the original files, 4 in total, stacked in image order."""
    root.mkdir(exist_ok=True)
    images = np.arange(3 * 3 * 6 * 8, dtype=np.uint8).reshape(3, 3, 6, 8)
    if masks is None:
        masks = np.full((4, 6, 8), 0.3, dtype=np.float32)
        masks[0, 0:2, 0:3] = 0.7
        masks[1, 3:6, 4:8] = 0.7
        masks[2, 1:5, 1:2] = 0.7
        masks[3, 5, 7] = 0.7
    if labels is None:
        labels = [np.array([1.0, 3.0]), np.array([]), np.array([2.0, 2.0])]
    boxes = [np.array([[0, 0, 3, 2], [4, 3, 8, 6]]), np.zeros((0, 4)), np.array([[1, 1, 2, 5], [7, 5, 7.5, 6]])]
    with h5py.File(root / IMAGES_FILE, "w") as file:
        file.create_dataset("data", data=images, compression="gzip")
    with h5py.File(root / MASKS_FILE, "w") as file:
        file.create_dataset("data", data=masks, compression="gzip")
    np.save(root / LABELS_FILE, object_array(labels), allow_pickle=True)
    np.save(root / BOXES_FILE, object_array(boxes), allow_pickle=True)
    return images, masks


def test_reads_images_masks_offsets_and_drops_degenerate_boxes(tmp_path):
    images, masks = write_cis680(tmp_path / "cis")
    with pytest.warns(UserWarning, match="dropped 1 degenerate box") as record:
        dataset = CIS680Dataset(root=tmp_path / "cis", split="all")
    assert len(record) == 1
    assert dataset.class_names == ["vehicles", "people", "animals"] and len(dataset) == 3
    image, target = dataset[0]
    assert torch.equal(image, torch.from_numpy(images[0])) and image.dtype == torch.uint8
    assert target["labels"].tolist() == [1, 3] and target["labels"].dtype == torch.int64
    assert target["boxes"].tolist() == [[0, 0, 3, 2], [4, 3, 8, 6]] and target["boxes"].dtype == torch.float32
    assert torch.equal(target["masks"], torch.from_numpy(masks[:2] > 0.5).to(torch.uint8))
    _, target = dataset[1]
    assert target["masks"].shape == (0, 6, 8) and target["boxes"].shape == (0, 4)
    _, target = dataset[2]  # its masks start after image 0's two: row 2, and row 3 belongs to the dropped box
    assert target["labels"].tolist() == [2]
    assert torch.equal(target["masks"][0], torch.from_numpy(masks[2] > 0.5).to(torch.uint8))
    assert dataset.image_size(2) == (6, 8)


def test_split_and_pickling_for_workers(tmp_path):
    write_cis680(tmp_path / "cis")
    with pytest.warns(UserWarning):
        train = CIS680Dataset(root=tmp_path / "cis", split="train", val_fraction=1 / 3, split_seed=2)
        val = CIS680Dataset(root=tmp_path / "cis", split="val", val_fraction=1 / 3, split_seed=2)
    order = torch.randperm(3, generator=torch.Generator().manual_seed(2)).tolist()
    assert train.indices == order[:2] and val.indices == order[2:]
    before = train[0]
    copy = pickle.loads(pickle.dumps(train))  # what a worker process receives: no open h5 handle
    assert copy._handles is None
    after = copy[0]
    assert torch.equal(before[0], after[0]) and torch.equal(before[1]["masks"], after[1]["masks"])


def test_bad_files(tmp_path):
    write_cis680(tmp_path / "a", masks=np.zeros((5, 6, 8), np.float32))
    with pytest.raises(DatasetError, match=f"{MASKS_FILE}: holds 5 masks but the labels count 4"):
        CIS680Dataset(root=tmp_path / "a")
    write_cis680(tmp_path / "b", labels=[np.array([1, 4]), np.array([]), np.array([2, 2])])
    with pytest.raises(DatasetError, match=f"{LABELS_FILE}: image 0 has labels \\[1, 4\\], expected 1..3"):
        CIS680Dataset(root=tmp_path / "b")
    write_cis680(tmp_path / "c", masks=np.zeros((4, 6, 9), np.float32))
    with pytest.raises(DatasetError, match=f"{MASKS_FILE}: expected masks \\[M, 6, 8\\]"):
        CIS680Dataset(root=tmp_path / "c")
    (tmp_path / "d").mkdir()
    with pytest.raises(DatasetError, match=f"{LABELS_FILE}: file not found"):
        CIS680Dataset(root=tmp_path / "d")
    write_cis680(tmp_path / "e")
    (tmp_path / "e" / IMAGES_FILE).write_bytes(b"not hdf5")
    with pytest.raises(DatasetError, match=f"{IMAGES_FILE}: cannot open as HDF5"):
        CIS680Dataset(root=tmp_path / "e")

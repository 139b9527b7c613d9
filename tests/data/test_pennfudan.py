import os
import urllib.error
import zipfile

import numpy as np
import pytest
import torch
from datafiles import pennfudan_masks, write_pennfudan
from PIL import Image

from maskrcnn.data import DatasetError
from maskrcnn.data import pennfudan as pf
from maskrcnn.data.pennfudan import PennFudanDataset, default_pennfudan_root, fetch_pennfudan, split_indices


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "PennFudanPed"
    write_pennfudan(folder, pennfudan_masks())
    return folder


def test_masks_boxes_and_labels_from_instance_ids(root):
    dataset = PennFudanDataset(root=root, split="all")
    assert dataset.class_names == ["person"] and len(dataset) == 3
    image, target = dataset[0]
    assert image.shape == (3, 8, 10) and image.dtype == torch.uint8
    assert target["image_id"] == 0
    assert target["labels"].tolist() == [1, 1]
    assert target["boxes"].tolist() == [[2, 1, 5, 4], [6, 5, 10, 8]]
    assert torch.equal(target["masks"], torch.from_numpy(np.stack([pennfudan_masks()[0] == k for k in (1, 2)]))
                       .to(torch.uint8))
    _, target = dataset[1]
    assert target["boxes"].tolist() == [[3, 0, 4, 6]]
    _, target = dataset[2]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 5, 5)
    assert dataset.image_size(1) == (6, 7)


def test_split_is_the_seeded_permutation(root):
    order = torch.randperm(3, generator=torch.Generator().manual_seed(4)).tolist()
    train = PennFudanDataset(root=root, split="train", num_val=1, split_seed=4)
    val = PennFudanDataset(root=root, split="val", num_val=1, split_seed=4)
    assert [train[i][1]["image_id"] for i in range(2)] == order[:2]
    assert [val[0][1]["image_id"]] == order[2:]
    assert split_indices(170, 50, "val", 1) == torch.randperm(170, generator=torch.Generator().manual_seed(1))[
        120:].tolist()
    assert split_indices(5, 0, "val", 0) == [] and sorted(split_indices(5, 0, "train", 0)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="cannot hold out 4 of 3"):
        PennFudanDataset(root=root, split="val", num_val=4)


def test_bad_folders_and_masks(root, tmp_path):
    with pytest.raises(DatasetError, match="not a Penn-Fudan folder.*`maskrcnn data pennfudan DIR`.*--set data.root=DIR"):
        PennFudanDataset(root=tmp_path / "nothing")
    Image.fromarray(np.zeros((8, 9), np.uint8), "L").save(root / "PedMasks" / "FudanPed00001_mask.png")
    dataset = PennFudanDataset(root=root, split="all")
    with pytest.raises(DatasetError, match=r"FudanPed00001_mask.png: mask of shape \(8, 9\) differs .*\(image id 0\)"):
        dataset[0]
    (root / "PNGImages" / "FudanPed00002.png").write_bytes(b"broken")
    with pytest.raises(DatasetError, match=r"FudanPed00002.png: cannot decode image \(image id 1\)"):
        dataset[1]
    (root / "PedMasks" / "FudanPed00003_mask.png").unlink()
    with pytest.raises(DatasetError, match="FudanPed00003_mask.png: mask file not found"):
        PennFudanDataset(root=root)


def test_fetch_from_zip_and_folder_and_offline(root, tmp_path, monkeypatch):
    archive = tmp_path / "PennFudanPed.zip"
    with zipfile.ZipFile(archive, "w") as file:
        for path in root.rglob("*.png"):
            file.write(path, path.relative_to(root.parent))
    from_zip = fetch_pennfudan(tmp_path / "a" / "pf", archive)
    assert from_zip == tmp_path / "a" / "pf"
    assert len(PennFudanDataset(root=from_zip, split="all")) == 3
    from_folder = fetch_pennfudan(tmp_path / "b", root.parent)
    assert sorted(p.name for p in (from_folder / "PedMasks").iterdir()) == sorted(
        p.name for p in (root / "PedMasks").iterdir())
    assert fetch_pennfudan(from_folder) == from_folder  # already there: nothing to do, no download
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["pf"]  # no temporary folder left

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(pf.urllib.request, "urlretrieve", offline)
    with pytest.raises(DatasetError, match="could not download .*PennFudanPed.zip .*pass its path as source"):
        fetch_pennfudan(tmp_path / "c")
    with pytest.raises(DatasetError, match="no PNGImages/ and PedMasks/"):
        fetch_pennfudan(tmp_path / "d", tmp_path / "a" / "pf" / "PNGImages")


def test_real_pennfudan_counts():
    if not os.environ.get("MASKRCNN_PENNFUDAN"):
        pytest.skip("Penn-Fudan not found (tests/conftest.py sets MASKRCNN_PENNFUDAN when ../shared/data/PennFudanPed "
                    "exists beside the repository)")
    root = default_pennfudan_root()
    dataset = PennFudanDataset(root=root, split="all")
    assert len(dataset) == 170
    instances = 0
    for i in range(len(dataset)):
        image, target = dataset[i]
        assert target["masks"].shape[1:] == image.shape[1:] == dataset.image_size(i)
        instances += len(target["labels"])
    assert instances == 423
    assert len(PennFudanDataset(root=root, split="train")) == 120

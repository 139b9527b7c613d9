"""Penn-Fudan pedestrians: `PNGImages/<name>.png` with `PedMasks/<name>_mask.png`, where every pixel holds its
instance id (0 background, 1..n pedestrians). One class, "person".

The data set's licence forbids reposting it: code finds it through data.root or the environment variable
`MASKRCNN_PENNFUDAN`, and `fetch_pennfudan` installs it.

Shape letters: N objects of one image, H/W image size.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from maskrcnn.data.common import DatasetError, masks_to_boxes, read_id_map, read_rgb, read_size, resolve_inside

PENNFUDAN_URL = "https://www.cis.upenn.edu/~jshi/ped_html/PennFudanPed.zip"


def default_pennfudan_root() -> Path:
    """`$MASKRCNN_PENNFUDAN`: the PennFudanPed folder when data.root is empty.

    Raises:
        DatasetError: the variable is not set either.
    """
    if not os.environ.get("MASKRCNN_PENNFUDAN"):
        raise DatasetError("data.root is not set: data.format=pennfudan needs --set data.root=DIR (the PennFudanPed "
                           "folder; `maskrcnn data pennfudan DIR` fetches it) or the environment variable "
                           "MASKRCNN_PENNFUDAN=DIR")
    return Path(os.environ["MASKRCNN_PENNFUDAN"])


def split_indices(count: int, num_val: int, split: str, seed: int) -> list[int]:
    """The seeded split shared by Penn-Fudan and CIS680: the last `num_val` entries of
    `torch.randperm(count, generator=torch.Generator().manual_seed(seed))` are "val", the others "train" (the
    torchvision tutorial's split), "all" is 0..count-1 in order."""
    if split == "all":
        return list(range(count))
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if not 0 <= num_val <= count:
        raise ValueError(f"cannot hold out {num_val} of {count} images for validation")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[count - num_val:] if split == "val" else order[:count - num_val]


class PennFudanDataset(Dataset):
    """Penn-Fudan pedestrian instance masks.

    Args:
        root: the PennFudanPed folder (containing PNGImages/ and PedMasks/).
        split: "train", "val" or "all".
        num_val: images held out for "val" (the last ones of the seeded permutation).
        split_seed: seed of the permutation.
        transform: optional paired transform applied to (image, target).
    """

    class_names = ["person"]

    def __init__(self, *, root: str | Path, split: str = "train", num_val: int = 50, split_seed: int = 1,
                 transform: Callable[[Tensor, dict], tuple[Tensor, dict]] | None = None):
        self.root = Path(root)
        image_dir, mask_dir = self.root / "PNGImages", self.root / "PedMasks"
        if not image_dir.is_dir() or not mask_dir.is_dir():
            raise DatasetError(f"{self.root}: not a Penn-Fudan folder (needs PNGImages/ and PedMasks/); get it with "
                               f"`maskrcnn data pennfudan DIR`, then add --set data.root=DIR (or set MASKRCNN_PENNFUDAN)")
        self.image_files = sorted(image_dir.glob("*.png"))
        if not self.image_files:
            raise DatasetError(f"{image_dir}: no .png images")
        self.mask_files = [mask_dir / f"{f.stem}_mask.png" for f in self.image_files]
        missing = [str(m) for m in self.mask_files if not m.is_file()]
        if missing:
            raise DatasetError(f"{missing[0]}: mask file not found (and {len(missing) - 1} more)")
        # image_id = position in the sorted file list, the same whatever the split
        self.indices = split_indices(len(self.image_files), num_val, split, split_seed)
        self.transform = transform
        self._sizes: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def image_size(self, index: int) -> tuple[int, int]:
        image_id = self.indices[index]
        if image_id not in self._sizes:
            self._sizes[image_id] = read_size(self.image_files[image_id], image_id)
        return self._sizes[image_id]

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image_id = self.indices[index]
        image_file, mask_file = self.image_files[image_id], self.mask_files[image_id]
        image = read_rgb(resolve_inside(image_file.parent, image_file.name, image_id, self.root), image_id)
        ids = read_id_map(resolve_inside(mask_file.parent, mask_file.name, image_id, self.root), image_id)
        if ids.ndim != 2 or ids.shape != tuple(image.shape[1:]):
            raise DatasetError(f"{mask_file}: mask of shape {ids.shape} differs from its image's (h, w) "
                               f"{tuple(image.shape[1:])} (image id {image_id})")
        instance_ids = np.unique(ids)
        instance_ids = instance_ids[instance_ids != 0]
        ids_t = torch.from_numpy(ids.astype(np.int64))
        masks = (ids_t[None] == torch.from_numpy(instance_ids.astype(np.int64))[:, None, None]).to(torch.uint8)
        target = {
            "boxes": masks_to_boxes(masks),  # [N, 4] tight boxes of [N, H, W] masks
            "labels": torch.ones(len(instance_ids), dtype=torch.int64),
            "masks": masks,
            "image_id": image_id,
        }
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def _find_root(folder: Path) -> Path | None:
    """The folder at or below `folder` holding PNGImages/ and PedMasks/."""
    for candidate in [folder, *sorted(p.parent for p in folder.rglob("PNGImages"))]:
        if (candidate / "PNGImages").is_dir() and (candidate / "PedMasks").is_dir():
            return candidate
    return None


def fetch_pennfudan(dest: str | Path, source: str | Path | None = None) -> Path:
    """Installs Penn-Fudan into `dest` (which then holds PNGImages/ and PedMasks/ directly).

    Does nothing when `dest` already holds the data set. Files are unpacked into a temporary folder beside `dest`
    and renamed into place, so an interrupted fetch never leaves a half-filled `dest`.

    Args:
        dest: the folder to create.
        source: a local PennFudanPed.zip or an unpacked folder; None downloads PENNFUDAN_URL.
    Returns:
        `dest` as a Path.
    Raises:
        DatasetError: the download failed (e.g. no network), or the source holds no Penn-Fudan layout.
    """
    dest = Path(dest)
    if _find_root(dest) == dest:
        return dest
    if dest.exists() and any(dest.iterdir()):
        raise DatasetError(f"{dest}: exists, is not empty and holds no Penn-Fudan data set")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pennfudan-", dir=dest.parent) as tmp:
        tmp = Path(tmp)
        if source is None:
            archive = tmp / "PennFudanPed.zip"
            try:
                urllib.request.urlretrieve(PENNFUDAN_URL, archive)
            except (urllib.error.URLError, OSError) as error:
                raise DatasetError(f"could not download {PENNFUDAN_URL} ({error}); without network, download it "
                                   f"elsewhere and pass its path as source") from None
            source = archive
        source = Path(source)
        if source.is_dir():
            found = _find_root(source)
            if found is None:
                raise DatasetError(f"{source}: no PNGImages/ and PedMasks/ folders below it")
            shutil.copytree(found, tmp / "out")
            found = tmp / "out"
        elif zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as archive_file:
                archive_file.extractall(tmp / "unzipped")  # extractall strips '..' and absolute member names
            found = _find_root(tmp / "unzipped")
            if found is None:
                raise DatasetError(f"{source}: the zip holds no PNGImages/ and PedMasks/ folders")
        else:
            raise DatasetError(f"{source}: neither a folder nor a zip file")
        if dest.exists():
            dest.rmdir()
        os.replace(found, dest)
    return dest

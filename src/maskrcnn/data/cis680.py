"""The original CIS680 project's files (a 3-class COCO subset at 300x400), read from one folder:

    hw3_mycocodata_img_comp_zlib.h5      dataset 'data': uint8 [N, 3, 300, 400] images
    hw3_mycocodata_mask_comp_zlib.h5     dataset 'data': [M, 300, 400] masks, all objects stacked in image order
    hw3_mycocodata_labels_comp_zlib.npy  object array, per image: labels [n_i] in 1..3
    hw3_mycocodata_bboxes_comp_zlib.npy  object array, per image: boxes [n_i, 4] xyxy px of the 300x400 image

The h5 files are opened lazily, once per process (each DataLoader worker gets its own handle), and only the rows of
one sample are read per `__getitem__`.

Shape letters: N images, M masks in total, n objects of one image, H/W image size.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from maskrcnn.data.common import DatasetError, warn_degenerate
from maskrcnn.data.pennfudan import split_indices

IMAGES_FILE = "hw3_mycocodata_img_comp_zlib.h5"
MASKS_FILE = "hw3_mycocodata_mask_comp_zlib.h5"
LABELS_FILE = "hw3_mycocodata_labels_comp_zlib.npy"
BOXES_FILE = "hw3_mycocodata_bboxes_comp_zlib.npy"
CLASS_NAMES = ["vehicles", "people", "animals"]


def _open_h5(path: Path) -> h5py.Dataset:
    try:
        file = h5py.File(path, "r")
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except OSError as error:
        raise DatasetError(f"{path}: cannot open as HDF5 ({error})") from None
    if "data" not in file:
        raise DatasetError(f"{path}: has no dataset 'data' (found {list(file.keys())})")
    return file["data"]


# What an .npy object array of numpy arrays (the original project's per-image labels and boxes) needs to unpickle.
_ARRAY_PICKLE_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype")}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and scalars only: a pickle can name any callable (`os.system`), so everything else is
    refused instead of run (`np.load(allow_pickle=True)` would run it)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ARRAY_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays are read")
        return super().find_class(module, name)


def _load_objects(path: Path) -> np.ndarray:
    """An .npy array; an object array (ragged per-image arrays) is unpickled by `_ArrayUnpickler`."""
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            _, _, dtype = read_header(file)
            if dtype.hasobject:  # np.save pickles the whole object array after the header
                return _ArrayUnpickler(file).load()
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise DatasetError(f"{path}: cannot read as a numpy array ({error})") from None


class CIS680Dataset(Dataset):
    """The original project's 3-class data set (labels 1 vehicles, 2 people, 3 animals).

    Args:
        root: folder holding the four files.
        split: "train", "val" or "all".
        val_fraction: fraction of the images held out for "val" (rounded), the last ones of a seeded permutation.
        split_seed: seed of the permutation.
        transform: optional paired transform applied to (image, target).
    """

    class_names = CLASS_NAMES

    def __init__(self, *, root: str | Path, split: str = "train", val_fraction: float = 0.2, split_seed: int = 1,
                 transform: Callable[[Tensor, dict], tuple[Tensor, dict]] | None = None):
        if not 0.0 <= val_fraction <= 1.0:
            raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
        self.root = Path(root)
        self.transform = transform
        labels_path, boxes_path = self.root / LABELS_FILE, self.root / BOXES_FILE
        labels_per_image, boxes_per_image = _load_objects(labels_path), _load_objects(boxes_path)
        images, masks = _open_h5(self.root / IMAGES_FILE), _open_h5(self.root / MASKS_FILE)
        try:
            num_images, num_masks = images.shape[0], masks.shape[0]
            if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
                raise DatasetError(f"{self.root / IMAGES_FILE}: expected uint8 images [N, 3, H, W], got "
                                   f"{images.dtype} {images.shape}")
            self.height, self.width = images.shape[2:]
            if masks.ndim != 3 or masks.shape[1:] != (self.height, self.width):
                raise DatasetError(f"{self.root / MASKS_FILE}: expected masks [M, {self.height}, {self.width}] like "
                                   f"the images, got {masks.shape}")
        finally:
            images.file.close()
            masks.file.close()
        if len(labels_per_image) != num_images or len(boxes_per_image) != num_images:
            raise DatasetError(f"{self.root}: {num_images} images but {len(labels_per_image)} label entries and "
                               f"{len(boxes_per_image)} box entries")

        # Per image: labels i64[n], boxes f32[n, 4], and the rows of its masks in the stacked mask file.
        self._labels, self._boxes, self._mask_rows = [], [], []
        offset, degenerate = 0, 0
        for image_id, (labels, boxes) in enumerate(zip(labels_per_image, boxes_per_image)):
            labels = np.asarray(labels).reshape(-1).astype(np.int64)
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            if len(labels) != len(boxes):
                raise DatasetError(f"{boxes_path}: image {image_id} has {len(boxes)} boxes but {len(labels)} labels")
            if len(labels) and (labels.min() < 1 or labels.max() > len(CLASS_NAMES)):
                raise DatasetError(f"{labels_path}: image {image_id} has labels {labels.tolist()}, expected 1..3")
            rows = np.arange(offset, offset + len(labels))
            offset += len(labels)
            keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
            degenerate += int((~keep).sum())
            self._labels.append(labels[keep])
            self._boxes.append(boxes[keep])
            self._mask_rows.append(rows[keep])
        if offset != num_masks:
            raise DatasetError(f"{self.root / MASKS_FILE}: holds {num_masks} masks but the labels count {offset} "
                               f"objects")
        warn_degenerate(degenerate, self.root)

        num_val = round(num_images * val_fraction)
        self.indices = split_indices(num_images, num_val, split, split_seed)
        self._handles: tuple[int, h5py.Dataset, h5py.Dataset] | None = None

    def __getstate__(self) -> dict:
        # h5py handles cannot cross process boundaries; each worker opens its own on first access.
        state = dict(self.__dict__)
        state["_handles"] = None
        return state

    def _datasets(self) -> tuple[h5py.Dataset, h5py.Dataset]:
        if self._handles is None or self._handles[0] != os.getpid():
            self._handles = (os.getpid(), _open_h5(self.root / IMAGES_FILE), _open_h5(self.root / MASKS_FILE))
        return self._handles[1], self._handles[2]

    def __len__(self) -> int:
        return len(self.indices)

    def image_size(self, index: int) -> tuple[int, int]:
        return self.height, self.width

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image_id = self.indices[index]
        images, masks = self._datasets()
        image = torch.from_numpy(images[image_id])  # [3, H, W] uint8
        rows = self._mask_rows[image_id]
        if len(rows):
            # h5py reads contiguous row ranges in one call; kept rows are increasing, usually contiguous.
            block = masks[rows[0]:rows[-1] + 1][rows - rows[0]]  # [n, H, W]
            binary = block > 0.5 if np.issubdtype(block.dtype, np.floating) else block != 0
            mask_t = torch.from_numpy(binary.astype(np.uint8))
        else:
            mask_t = torch.zeros((0, self.height, self.width), dtype=torch.uint8)
        target = {
            "boxes": torch.from_numpy(self._boxes[image_id].copy()),
            "labels": torch.from_numpy(self._labels[image_id].copy()),
            "masks": mask_t,
            "image_id": image_id,
        }
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target

"""Pieces shared by the data set readers: the error type, image decoding and tight boxes of masks.

Shape letters: N objects of one image, H/W image height/width.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor


class DatasetError(ValueError):
    """Bad input data; the message names the file and the image / annotation id or the field at fault."""


def read_rgb(path: Path, image_id: object) -> Tensor:
    """Decodes an image file to RGB (grayscale, palette and RGBA converted).

    Args:
        path: the image file.
        image_id: the id named in the error message.
    Returns:
        uint8[3, H, W].
    Raises:
        DatasetError: the file is missing or cannot be decoded.
    """
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found (image id {image_id})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"{path}: cannot decode image (image id {image_id}): {error}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def read_size(path: Path, image_id: object) -> tuple[int, int]:
    """(h, w) of an image file from its header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found (image id {image_id})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"{path}: cannot read image header (image id {image_id}): {error}") from None
    return height, width


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight boxes around binary masks, in pixel-edge coordinates (a mask covering only pixel column 3 spans
    x1 = 3, x2 = 4), so that width and height count pixels as COCO's boxes do.

    Args:
        masks: bool/uint8[N, H, W], every mask non-empty.
    Returns:
        f32[N, 4] xyxy.
    """
    n, height, width = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    rows = masks.bool().any(dim=2)  # (N, H, W) -> (N, H)
    cols = masks.bool().any(dim=1)  # (N, H, W) -> (N, W)
    # argmax returns the first maximum: the first occupied row/column from either end.
    y1 = rows.byte().argmax(dim=1)
    y2 = height - rows.flip(1).byte().argmax(dim=1)
    x1 = cols.byte().argmax(dim=1)
    x2 = width - cols.flip(1).byte().argmax(dim=1)
    return torch.stack([x1, y1, x2, y2], dim=1).float()


def warn_degenerate(count: int, source: object) -> None:
    """One warning per data set for the boxes dropped because their width or height is under 1 px."""
    if count:
        warnings.warn(f"{source}: dropped {count} degenerate box(es) with width or height under 1 px", stacklevel=3)

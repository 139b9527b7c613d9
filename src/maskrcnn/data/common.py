"""Pieces shared by the data set readers: the error type, image decoding and tight boxes of masks.

Every image this package reads (data sets and `maskrcnn predict`) goes through `read_rgb` / `read_size`, so that
EXIF orientation, 16-bit scaling and the pixel limit hold everywhere.

Shape letters: N objects of one image, H/W image height/width.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from maskrcnn.errors import UserError

# Largest image (height x width) read, e.g. 15000 x 10000: its decoded RGB takes 450 MB and the model's float copy
# 1.8 GB before resizing. Larger files are refused from their header, before their pixels are decoded.
MAX_IMAGE_PIXELS = 150_000_000

# EXIF orientations (tag 0x0112) that swap width and height: 5..8 are the transposed and 90/270-degree rotations.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)

# Pillow's modes for 16-bit (and 32-bit integer) single-channel images; convert("RGB") would clip them at 255.
_WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class DatasetError(UserError, ValueError):
    """Bad input data; the message names the file and the image / annotation id or the field at fault."""


def _problem(path: Path, image_id: object, problem: str) -> DatasetError:
    return DatasetError(f"{path}: {problem}" if image_id is None else f"{path}: {problem} (image id {image_id})")


@contextmanager
def _open_image(path: Path, image_id: object, action: str) -> Iterator[Image.Image]:
    """Opens an image, refusing it above MAX_IMAGE_PIXELS and turning every decoding failure into a DatasetError."""
    limit = f"over the limit of {MAX_IMAGE_PIXELS} pixels (maskrcnn.data.common.MAX_IMAGE_PIXELS); downscale it"
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 megapixels and raises from 179; this module applies MAX_IMAGE_PIXELS instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise _problem(path, image_id, f"{width} x {height} pixels is {limit}")
                yield image
    except FileNotFoundError:
        raise _problem(path, image_id, "image file not found") from None
    except IsADirectoryError:
        raise _problem(path, image_id, "is a folder, not an image file") from None
    except Image.DecompressionBombError as error:
        raise _problem(path, image_id, f"{limit} ({error})") from None
    except DatasetError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        detail = " ".join(str(error).split())
        raise DatasetError(f"{_problem(path, image_id, f'cannot {action}')}: {detail}") from None


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """uint8[H, W, 3] of any Pillow image; 16-bit values are scaled to 8 bit (v / 257, rounded), not clipped."""
    if image.mode in _WIDE_INTEGER_MODES:
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{image.mode} image with values outside 0..65535 (not a 16-bit photo)")
        gray = np.rint(values.astype(np.float32) / 257.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
    return np.asarray(image.convert("RGB"))


def read_rgb(path: Path, image_id: object = None) -> Tensor:
    """Decodes an image file to RGB, upright as its EXIF orientation says (grayscale, palette and RGBA converted;
    16-bit scaled to 8 bit).

    Args:
        path: the image file.
        image_id: the id named in the error message (None: only the file is named).
    Returns:
        uint8[3, H, W], H and W after the EXIF rotation.
    Raises:
        DatasetError: the file is missing, cannot be decoded or is over MAX_IMAGE_PIXELS.
    """
    with _open_image(Path(path), image_id, "decode image") as image:
        return image_to_rgb(image)


def image_to_rgb(image: Image.Image) -> Tensor:
    """uint8[3, H, W] of an opened image, as `read_rgb` decodes a file (the server decodes request bodies with it).

    Raises:
        OSError, ValueError: the pixels cannot be decoded (a truncated file, 16-bit values outside 0..65535).
    """
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    return torch.from_numpy(_to_rgb_array(image).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def read_size(path: Path, image_id: object = None) -> tuple[int, int]:
    """(h, w) of an image file as `read_rgb` returns it (after the EXIF rotation), from its header only."""
    with _open_image(Path(path), image_id, "read image header") as image:
        width, height = image.size
        if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED_ORIENTATIONS:
            width, height = height, width
    return height, width


def read_id_map(path: Path, image_id: object = None) -> np.ndarray:
    """The raw values of a single-channel label image (e.g. Penn-Fudan's instance ids), neither rotated nor
    converted: label maps carry ids, not colours.

    Returns:
        [H, W] array of the file's own dtype (a multi-channel file gives [H, W, C]; callers check the shape).
    Raises:
        DatasetError: the file is missing, cannot be decoded or is over MAX_IMAGE_PIXELS.
    """
    with _open_image(Path(path), image_id, "decode mask") as image:
        return np.asarray(image)


def resolve_inside(folder: Path, relative: str | Path, image_id: object, source: object) -> Path:
    """`folder / relative` with every symbolic link resolved, refused when it lands outside `folder` (a link in a
    downloaded data set must not make the reader open files elsewhere on the machine).

    Raises:
        DatasetError: the resolved file lies outside the resolved `folder`.
    """
    base = Path(folder).resolve()
    file = (base / relative).resolve()
    if not file.is_relative_to(base):
        raise DatasetError(f"{source}: image {image_id}: {Path(folder) / relative} is a link to {file}, outside the "
                           f"images folder {base}")
    return file


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

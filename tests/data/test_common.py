import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.data.common import DatasetError, masks_to_boxes, read_rgb, read_size, warn_degenerate


def test_masks_to_boxes_by_hand():
    masks = torch.zeros(2, 4, 5, dtype=torch.uint8)
    masks[0, 1, 3] = 1  # one pixel: box of 1 x 1 px
    masks[1, 0:4, 0:2] = 1
    assert masks_to_boxes(masks).tolist() == [[3, 1, 4, 2], [0, 0, 2, 4]]
    assert masks_to_boxes(masks[:0]).shape == (0, 4) and masks_to_boxes(masks).dtype == torch.float32


def palette_image() -> Image.Image:
    image = Image.fromarray(np.zeros((3, 4), dtype=np.uint8), "P")
    image.putpalette([200, 200, 200, 10, 20, 30])
    image.putpixel((0, 0), 1)
    return image


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_read_rgb_converts_every_mode_to_three_channels(tmp_path, mode):
    pixels = np.full((3, 4, 3), 200, dtype=np.uint8)
    pixels[0, 0] = (10, 20, 30)
    (palette_image() if mode == "P" else Image.fromarray(pixels).convert(mode)).save(tmp_path / "x.png")
    image = read_rgb(tmp_path / "x.png", 5)
    assert image.shape == (3, 3, 4) and image.dtype == torch.uint8
    assert image[:, 1, 1].tolist() == [200, 200, 200]
    if mode != "L":
        assert image[:, 0, 0].tolist() == [10, 20, 30]
    assert read_size(tmp_path / "x.png", 5) == (3, 4)


def test_read_errors_name_the_file_and_id(tmp_path):
    with pytest.raises(DatasetError, match=r"y.jpg: image file not found \(image id 9\)"):
        read_rgb(tmp_path / "y.jpg", 9)
    (tmp_path / "z.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DatasetError, match=r"z.jpg: cannot decode image \(image id 3\)"):
        read_rgb(tmp_path / "z.jpg", 3)
    with pytest.raises(DatasetError, match=r"z.jpg: cannot read image header \(image id 3\)"):
        read_size(tmp_path / "z.jpg", 3)


def test_warn_degenerate_only_when_something_was_dropped():
    with pytest.warns(UserWarning, match="data.json: dropped 3 degenerate box"):
        warn_degenerate(3, "data.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_degenerate(0, "data.json")

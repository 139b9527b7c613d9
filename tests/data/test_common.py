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


def exif_image(orientation: int) -> Image.Image:
    """A 2 x 3 (h x w) image whose stored pixels are all 0 but (0, 0), which is 255, tagged with an EXIF orientation."""
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[0, 0] = 255
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    return image


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("orientation, size, bright", [
    (1, (2, 3), (0, 0)),  # as stored
    (3, (2, 3), (1, 2)),  # rotated 180 degrees: the first pixel becomes the last
    (6, (3, 2), (0, 1)),  # "rotate 90 CW to view": the stored top-left corner ends top-right
    (8, (3, 2), (2, 0)),  # "rotate 90 CCW to view": it ends bottom-left
])
def test_exif_orientation_is_applied(tmp_path, suffix, orientation, size, bright):
    path = tmp_path / f"photo{suffix}"
    image = exif_image(orientation)
    image.save(path, exif=image.info["exif"], **({"quality": 100, "subsampling": 0} if suffix == ".jpg" else {}))
    pixels = read_rgb(path)
    assert tuple(pixels.shape[1:]) == size and read_size(path) == size
    brightest = divmod(int(pixels.sum(0).argmax()), size[1])
    assert brightest == bright


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896], [65535, 128, 65278]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    pixels = read_rgb(tmp_path / "deep.png")
    # v / 257 rounded: 128 / 257 = 0.498 -> 0; 32896 / 257 = 128; 65278 / 257 = 254
    assert pixels[0].tolist() == [[0, 1, 128], [255, 0, 254]]
    assert (pixels[0] == pixels[1]).all() and (pixels[1] == pixels[2]).all()

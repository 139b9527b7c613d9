import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import paste_masks_in_image

from maskrcnn.model.postprocess import paste_masks


def _paste_one(mask, box, size, mode="exact"):
    return paste_masks(mask[None], torch.tensor([box]), [1], [size], mode=mode)[0][0, 0]


def test_full_mask_fills_exactly_the_box():
    pasted = _paste_one(torch.ones(28, 28), [10.0, 20.0, 38.0, 48.0], (60, 50))
    expected = torch.zeros(60, 50)
    expected[20:48, 10:38] = 1
    torch.testing.assert_close(pasted, expected)


def test_half_mask_at_twice_the_size_by_hand():
    mask = torch.zeros(28, 28)
    mask[:, :14] = 1  # left half
    pasted = _paste_one(mask, [0.0, 0.0, 56.0, 56.0], (56, 60))
    # pixel x samples mask column u = (x + 0.5) / 2 - 0.5; columns 0..13 are 1
    assert pasted[30, 0].item() == pytest.approx(0.75, abs=1e-5)  # u = -0.25: a quarter from the zero outside
    assert pasted[30, 26].item() == pytest.approx(1.0, abs=1e-5)  # u = 12.75
    assert pasted[30, 27].item() == pytest.approx(0.75, abs=1e-5)  # u = 13.25
    assert pasted[30, 28].item() == pytest.approx(0.25, abs=1e-5)  # u = 13.75
    assert pasted[30, 29].item() == pytest.approx(0.0, abs=1e-5)  # u = 14.25
    assert pasted[:, 56:].abs().max().item() == 0.0  # nothing outside the box
    assert pasted[0, 10].item() == pytest.approx(0.75, abs=1e-5)  # top edge, same rule along y


def test_never_stretched_over_the_image():
    pasted = _paste_one(torch.ones(28, 28), [40.0, 40.0, 50.0, 45.0], (100, 100))
    assert pasted.sum().item() == pytest.approx(10 * 5)


def test_several_images_of_different_sizes():
    masks = torch.ones(3, 1, 28, 28)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 25.0], [0.0, 0.0, 4.0, 4.0]])
    out = paste_masks(masks, boxes, [2, 0, 1], [(30, 40), (20, 20), (8, 6)])
    assert [tuple(o.shape) for o in out] == [(2, 1, 30, 40), (0, 1, 20, 20), (1, 1, 8, 6)]
    assert out[0][1].sum().item() == pytest.approx(10 * 20)
    assert out[2][0].sum().item() == pytest.approx(16)


def test_exact_mode_equals_grid_sample_over_the_image():
    torch.manual_seed(1)
    count, height, width = 20, 40, 56
    masks = torch.rand(count, 1, 28, 28)
    xy = torch.rand(count, 2) * 40 - 5
    boxes = torch.cat([xy, xy + torch.rand(count, 2) * 30 + 0.5], dim=1)
    # Detectron2's paste: every pixel centre mapped into the box, normalised to -1..1, bilinear, zero outside
    gx = ((torch.arange(width) + 0.5)[None] - boxes[:, 0:1]) / (boxes[:, 2:3] - boxes[:, 0:1]) * 2 - 1  # (D, W)
    gy = ((torch.arange(height) + 0.5)[None] - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2]) * 2 - 1  # (D, H)
    grid = torch.stack([gx[:, None, :].expand(-1, height, -1), gy[:, :, None].expand(-1, -1, width)], dim=3)
    expected = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    got = paste_masks(masks, boxes, [count], [(height, width)])[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(150, 170), (64, 48)])
def test_torchvision_mode_reproduces_paste_masks_in_image(size):
    torch.manual_seed(0)
    count = 60
    masks = torch.rand(count, 1, 28, 28)
    # some boxes cross the right / bottom border (detections are clipped: never left of or above the image)
    xy = torch.rand(count, 2) * torch.tensor([size[1] - 4.0, size[0] - 4.0])
    wh = torch.rand(count, 2) * 80 + 0.2  # including sub-pixel boxes
    boxes = torch.cat([xy, xy + wh], dim=1)
    theirs = paste_masks_in_image(masks, boxes, size)
    ours = paste_masks(masks, boxes, [count], [size], mode="torchvision")[0]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-5
    a, b = ours >= 0.5, theirs >= 0.5
    assert ((a & b).sum() / (a | b).sum()).item() >= 0.98


def test_empty_and_bad_mode():
    out = paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), [0], [(5, 6)])
    assert out[0].shape == (0, 1, 5, 6)
    with pytest.raises(ValueError, match="mode"):
        paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), [0], [(5, 6)], "x")


@pytest.mark.parametrize("mode", ["exact", "torchvision"])
def test_chunked_paste_equals_one_chunk(mode):
    torch.manual_seed(0)
    masks = torch.rand(9, 28, 28)
    xy = torch.rand(9, 2) * 50
    boxes = torch.cat([xy, xy + torch.rand(9, 2) * 40 + 1], dim=1)
    counts, sizes = [5, 4], [(70, 90), (60, 50)]
    whole = paste_masks(masks, boxes, counts, sizes, mode=mode)
    # a bound below one mask's intermediates: every mask is its own chunk
    chunked = paste_masks(masks, boxes, counts, sizes, mode=mode, chunk_bytes=1)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)

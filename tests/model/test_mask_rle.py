from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from maskrcnn.engine.checkpoint import load_model
from maskrcnn.engine.coco_results import masks_to_rle
from maskrcnn.export.runtime import Predictor
from maskrcnn.model.mask_rle import BoxMasks, paste_masks_rle, window_rle_counts
from maskrcnn.model.postprocess import paste_masks, paste_support


def _dense_rle(masks, boxes, size, mode="exact", threshold=0.5):
    """The reference: dense paste of the whole image, threshold, pycocotools."""
    pasted = paste_masks(masks, boxes, [masks.shape[0]], [size], mode=mode)[0][:, 0]
    return masks_to_rle((pasted >= threshold).numpy().astype(np.uint8))


def _compressed(counts, size):
    return mask_utils.frPyObjects({"size": list(size), "counts": counts}, *size)["counts"].decode("ascii")


def test_box_at_an_offset_by_hand():
    # an all-ones mask in box x 1..3, y 2..5 of a 6 x 5 image fills pixels x in {1, 2}, y in {2, 3, 4};
    # column-major: column 0 and rows 0-1 of column 1 are 8 zeros, then 3 ones, 1 + 2 zeros, 3 ones, 1 + 6 + 6 zeros
    rle = paste_masks_rle(torch.ones(1, 28, 28), torch.tensor([[1.0, 2.0, 3.0, 5.0]]), (6, 5))
    assert rle == [{"size": [6, 5], "counts": _compressed([8, 3, 3, 3, 13], (6, 5))}]
    decoded = mask_utils.decode({"size": [6, 5], "counts": rle[0]["counts"].encode()})
    expected = np.zeros((6, 5), np.uint8)
    expected[2:5, 1:3] = 1
    np.testing.assert_array_equal(decoded, expected)


def test_window_counts_by_hand():
    window = torch.tensor([[True, False], [True, True]])  # at (top 1, left 2) of a 3 x 4 image
    # column-major pixels 0..11; column 2 (pixels 6..8): rows 1, 2 set; column 3 (9..11): row 2 set
    # -> 0s: 7 (0..6), 1s: 2 (7, 8), 0s: 2 (9, 10), 1s: 1 (11), the last pixel
    assert window_rle_counts(window, (1, 2), (3, 4)).tolist() == [7, 2, 2, 1]
    assert window_rle_counts(window, (0, 1), (3, 4)).tolist() == [3, 2, 2, 1, 4]
    # a window spanning the height: the run at the bottom of column 1 goes on at the top of column 2, and the
    # mask ends on the image's last pixel (no empty run at the end, as pycocotools)
    full = torch.tensor([[False, True, True], [True, True, True]])
    assert window_rle_counts(full, (0, 1), (2, 4)).tolist() == [3, 5]
    assert window_rle_counts(torch.zeros(2, 2, dtype=torch.bool), (1, 1), (3, 3)).tolist() == [9]
    assert window_rle_counts(torch.ones(3, 3, dtype=torch.bool), (0, 0), (3, 3)).tolist() == [0, 9]


def test_support_reaches_half_a_mask_cell_beyond_the_box():
    # box 10..20 with M = 2: a mask cell is 5 px; pixel x has mask coordinate u = (x + 0.5 - 10) / 5 - 0.5 and
    # weight for -1 < u < 2, i.e. 7 < x < 22: pixels 8..21; the support adds one pixel and the rounding margin
    first, stop = paste_support(torch.tensor([10.0]), torch.tensor([20.0]), 100, 2)
    assert (first.item(), stop.item()) == (6, 24)
    pasted = paste_masks(torch.ones(1, 2, 2), torch.tensor([[10.0, 0.0, 20.0, 5.0]]), [1], [(5, 100)])[0][0, 0, 2]
    assert pasted.nonzero().flatten().tolist() == list(range(8, 22))
    # torchvision mode: the inclusive integer box of the padded, expanded box (10..20 expanded by 4 / 2)
    first, stop = paste_support(torch.tensor([10.0]), torch.tensor([20.0]), 100, 2, mode="torchvision")
    assert (first.item(), stop.item()) == (5, 26)
    first, stop = paste_support(torch.tensor([150.0, -30.0]), torch.tensor([160.0, -20.0]), 100, 28)
    assert (first == stop).all()  # boxes outside the image reach nothing


HAND_BOXES = [
    [12.3, 7.9, 40.2, 33.1],  # at an offset
    [-6.0, -3.0, 20.0, 15.0],  # over the top-left border
    [50.0, 30.0, 75.0, 49.0],  # over the bottom-right border
    [0.0, 0.0, 64.0, 48.0],  # the whole image
    [20.2, 20.1, 20.6, 20.4],  # sub-pixel
    [30.0, 10.0, 30.0, 25.0],  # degenerate: zero width
    [35.0, 12.0, 31.0, 20.0],  # inverted
    [70.0, 10.0, 90.0, 20.0],  # outside the image
]


@pytest.mark.parametrize("mode", ["exact", "torchvision"])
def test_equal_to_dense_paste_on_hand_made_boxes(mode):
    torch.manual_seed(0)
    boxes = torch.tensor(HAND_BOXES)
    masks = torch.rand(len(boxes), 28, 28)
    assert paste_masks_rle(masks, boxes, (48, 64), mode=mode) == _dense_rle(masks, boxes, (48, 64), mode)
    ones = torch.ones(len(boxes), 1, 28, 28)
    assert paste_masks_rle(ones, boxes, (48, 64), mode=mode, threshold=0.3) == _dense_rle(ones, boxes, (48, 64), mode, 0.3)


def test_zero_detections_and_bad_mode():
    assert paste_masks_rle(torch.zeros(0, 28, 28), torch.zeros(0, 4), (10, 10)) == []
    with pytest.raises(ValueError, match="mode"):
        paste_masks_rle(torch.zeros(1, 28, 28), torch.zeros(1, 4), (10, 10), mode="nearest")


@pytest.mark.parametrize("mode", ["exact", "torchvision"])
@pytest.mark.parametrize("near_half", [False, True])
def test_equal_to_dense_paste_with_realistic_boxes(mode, near_half):
    torch.manual_seed(1)
    count, height, width = 100, 480, 640
    xy = torch.rand(count, 2) * torch.tensor([width, height]) - 20
    wh = torch.rand(count, 2) ** 2 * torch.tensor([width, height]) * 0.7 + 1  # mostly small, a few large
    boxes = torch.cat([xy, xy + wh], dim=1).clamp(min=0)
    masks = torch.rand(count, 28, 28)
    if near_half:  # within 3 ulps of the threshold: pixels flip when a sum differs in the last bit from the paste's
        masks = 0.5 + torch.randint(-3, 4, (count, 28, 28)) * 2.0**-25
    # chunk_bytes small enough that the weights come in several chunks
    assert paste_masks_rle(masks, boxes, (height, width), mode=mode, chunk_bytes=2**20) == _dense_rle(
        masks, boxes, (height, width), mode)


def test_never_a_dense_mask_of_the_image():
    # 100 small detections in a 40000 x 30000 image: a dense f32 paste would be 480 GB
    torch.manual_seed(2)
    xy = torch.randint(0, 29000, (100, 2)).float()
    boxes = torch.cat([xy, xy + 50], dim=1)
    rles = paste_masks_rle(torch.ones(100, 28, 28), boxes, (40000, 30000))
    assert mask_utils.area(rles).tolist() == [50 * 50] * 100  # an all-ones mask fills exactly its integer box
    assert mask_utils.toBbox(rles).tolist() == [[x, y, 50, 50] for x, y in xy.tolist()]


@pytest.fixture(scope="module")
def trained_model(tiny_run):
    return load_model(tiny_run / "last.pt", overrides=["model.box_head.score_thresh=0"]).model


def test_trained_model_rle_equals_dense(trained_model):
    torch.manual_seed(3)
    images = [torch.rand(3, 480, 640), torch.rand(3, 200, 150)]
    dense = trained_model.inference(images)
    rle = trained_model.inference(images, masks="rle")
    boxed = trained_model.inference(images, masks="boxed")
    assert len(dense[0]["boxes"]) > 0
    for d, r, b, image in zip(dense, rle, boxed, images):
        assert r["masks"] == masks_to_rle((d["masks"][:, 0] >= 0.5).numpy().astype(np.uint8))
        torch.testing.assert_close(r["boxes"], d["boxes"], rtol=0, atol=0)
        assert isinstance(b["masks"], BoxMasks) and len(b["masks"]) == len(d["boxes"])
        assert b["masks"].image_size == tuple(image.shape[-2:])
        torch.testing.assert_close(b["masks"].dense(), d["masks"], rtol=0, atol=0)
        assert b["masks"].rle() == r["masks"]
        assert b["masks"][[0, 2]].rle() == [r["masks"][0], r["masks"][2]]
        assert b["masks"][1].rle() == [r["masks"][1]]
    with pytest.raises(ValueError, match="masks must be one of"):
        trained_model.inference(images, masks="polygons")


class _FixedGraph(Predictor):
    """An exported predictor whose graph returns fixed padded outputs (B = 1, D = 3 slots, 2 filled)."""

    def __init__(self, outputs):
        self.outputs = outputs
        self.info = SimpleNamespace(paste_mode="exact")

    def run(self, images):
        return self.outputs


def test_exported_predictor_rle_equals_its_dense_paste():
    torch.manual_seed(4)
    outputs = {"boxes": torch.tensor([[[5.0, 6.0, 40.5, 30.2], [-3.0, 20.0, 70.0, 47.0], [0.0, 0.0, 0.0, 0.0]]]),
               "scores": torch.tensor([[0.9, 0.4, 0.0]]), "labels": torch.tensor([[1, 2, 0]]),
               "masks": torch.rand(1, 3, 28, 28), "num_detections": torch.tensor([2])}
    predictor = _FixedGraph(outputs)
    image = torch.zeros(3, 48, 64)
    dense = predictor([image])[0]
    rle = predictor([image], masks="rle")[0]
    boxed = predictor([image], masks="boxed")[0]
    assert dense["masks"].shape == (2, 1, 48, 64)
    assert rle["masks"] == masks_to_rle((dense["masks"][:, 0] >= 0.5).numpy().astype(np.uint8))
    assert boxed["masks"].rle() == rle["masks"] and rle["labels"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="masks must be one of"):
        predictor([image], masks="png")

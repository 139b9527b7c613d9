import pytest
import torch

from maskrcnn.data.transforms import Compose, RandomHorizontalFlip, ResizeShortestEdge


def sample(height=6, width=5):
    image = torch.arange(3 * height * width, dtype=torch.uint8).reshape(3, height, width)
    masks = torch.zeros(2, height, width, dtype=torch.uint8)
    masks[0, 0:2, 1:3] = 1  # box x 1..3, y 0..2
    masks[1, 3:6, 4:5] = 1  # box x 4..5, y 3..6
    target = {"boxes": torch.tensor([[1.0, 0, 3, 2], [4, 3, 5, 6]]), "labels": torch.tensor([1, 2]), "masks": masks,
              "image_id": 7}
    return image, target


def test_flip_by_hand():
    image, target = sample()
    flipped, out = RandomHorizontalFlip(1.0)(image, target)
    assert out["boxes"].tolist() == [[2, 0, 4, 2], [0, 3, 1, 6]]  # x1' = W - x2, x2' = W - x1 with W = 5
    assert torch.equal(flipped[:, :, 0], image[:, :, 4])
    assert out["masks"][1, 3:6, 0].tolist() == [1, 1, 1]
    assert out["labels"] is target["labels"] and out["image_id"] == 7
    assert target["boxes"][0].tolist() == [1, 0, 3, 2]  # the input is not modified


def test_flip_twice_is_identity_and_p_zero_does_nothing():
    image, target = sample()
    flip = RandomHorizontalFlip(1.0)
    back_image, back = flip(*flip(image, target))
    assert torch.equal(back_image, image)
    assert torch.equal(back["boxes"], target["boxes"]) and torch.equal(back["masks"], target["masks"])
    same_image, same = RandomHorizontalFlip(0.0)(image, target)
    assert same_image is image and same is target
    with pytest.raises(ValueError):
        RandomHorizontalFlip(1.5)


def test_flip_probability_follows_the_global_generator():
    image, target = sample()
    torch.manual_seed(0)
    flips = sum(not torch.equal(RandomHorizontalFlip(0.5)(image, target)[0], image) for _ in range(200))
    assert 70 < flips < 130


def test_resize_output_size_by_hand():
    assert ResizeShortestEdge(40, 100).output_size(20, 30) == (40, 60)
    assert ResizeShortestEdge(20, 60).output_size(10, 50) == (12, 60)  # 2x would make 100 > 60: scale 1.2
    assert ResizeShortestEdge(8).output_size(4, 1000) == (8, 2000)


def test_resize_scales_boxes_and_masks_consistently():
    image, target = sample(6, 5)
    resized, out = ResizeShortestEdge(10, 100)(image, target)  # scale 2
    assert resized.shape == (3, 12, 10) and resized.dtype == torch.uint8
    assert out["boxes"].tolist() == [[2, 0, 6, 4], [8, 6, 10, 12]]
    assert out["masks"].shape == (2, 12, 10) and out["masks"].dtype == torch.uint8
    assert out["masks"][0].sum() == 16 and out["masks"][0, 0:4, 2:6].all()


@pytest.mark.parametrize("size", [(7, 9), (13, 5)])
@pytest.mark.parametrize("min_size", [4, 11, 32])
def test_boxes_enclose_masks_after_resize(size, min_size):
    generator = torch.Generator().manual_seed(min_size)
    height, width = size
    masks = (torch.rand(3, height, width, generator=generator) > 0.6).to(torch.uint8)
    masks[:, height // 2, width // 2] = 1
    rows, cols = masks.any(2), masks.any(1)
    boxes = torch.stack([cols.float().argmax(1), rows.float().argmax(1),
                         width - cols.flip(1).float().argmax(1), height - rows.flip(1).float().argmax(1)], 1).float()
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    _, out = ResizeShortestEdge(min_size, 1000)(image, {"boxes": boxes, "labels": torch.ones(3), "masks": masks})
    for mask, box in zip(out["masks"], out["boxes"]):
        ys, xs = mask.nonzero(as_tuple=True)
        assert len(ys) > 0
        # every mask pixel's centre lies inside its scaled box
        assert (xs + 0.5 >= box[0]).all() and (xs + 0.5 <= box[2]).all()
        assert (ys + 0.5 >= box[1]).all() and (ys + 0.5 <= box[3]).all()


def test_resize_empty_target_and_compose():
    image = torch.zeros(3, 4, 8, dtype=torch.uint8)
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 4, 8, dtype=torch.uint8)}
    out_image, out = Compose([ResizeShortestEdge(8), RandomHorizontalFlip(1.0)])(image, target)
    assert out_image.shape == (3, 8, 16) and out["masks"].shape == (0, 8, 16) and out["boxes"].shape == (0, 4)

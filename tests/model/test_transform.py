import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from maskrcnn.model.transform import ImageTransform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_transform(min_size=800, max_size=1333, size_divisible=32, fixed_canvas=None):
    return ImageTransform(min_size=min_size, max_size=max_size, size_divisible=size_divisible,
                          fixed_canvas=fixed_canvas, image_mean=MEAN, image_std=STD).eval()


def test_resized_sizes_by_hand():
    transform = make_transform()
    batch, _ = transform([torch.rand(3, 300, 400), torch.rand(3, 1000, 300)])
    # 300x400: short side to 800 (x2.667) -> 800 x floor(1066.67); 1000x300: the long side caps at 1333 (x1.333)
    # -> 1333 x floor(399.9)
    assert batch.image_sizes.tolist() == [[800, 1066], [1333, 399]]
    assert batch.original_sizes.tolist() == [[300, 400], [1000, 300]]
    assert batch.tensor.shape == (2, 3, 1344, 1088)  # max 1333 and 1066 rounded up to multiples of 32


@pytest.mark.parametrize("sizes", [[(31, 47), (50, 20)], [(17, 99)], [(64, 64), (33, 65)]])
def test_pixels_equal_torchvision(sizes):
    images = [torch.rand(3, h, w) for h, w in sizes]
    batch, _ = make_transform(min_size=40, max_size=70)(images)
    reference = GeneralizedRCNNTransform(40, 70, list(MEAN), list(STD)).eval()
    image_list, _ = reference(images)
    assert batch.image_sizes.tolist() == [list(s) for s in image_list.image_sizes]
    assert torch.equal(batch.tensor, image_list.tensors)


def test_sizes_equal_torchvision_at_default_settings():
    images = [torch.rand(3, h, w) for h, w in [(333, 500), (479, 641), (1001, 299), (97, 1003)]]
    batch, _ = make_transform()(images)
    image_list, _ = GeneralizedRCNNTransform(800, 1333, list(MEAN), list(STD)).eval()(images)
    assert batch.image_sizes.tolist() == [list(s) for s in image_list.image_sizes]
    assert batch.tensor.shape == image_list.tensors.shape


def test_padding_to_multiple_of_32_without_resize():
    images = [torch.rand(3, 50, 70), torch.rand(3, 40, 90)]
    batch, _ = make_transform(min_size=None, max_size=None)(images)
    assert batch.tensor.shape == (2, 3, 64, 96)
    assert batch.image_sizes.tolist() == [[50, 70], [40, 90]]
    normalised = (images[1] - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    assert torch.equal(batch.tensor[1, :, :40, :90], normalised)
    assert batch.tensor[1, :, 40:].abs().sum() == 0 and batch.tensor[1, :, :, 90:].abs().sum() == 0
    assert batch.tensor[0, :, 50:].abs().sum() == 0 and batch.tensor[0, :, :, 70:].abs().sum() == 0


def test_max_size_alone_only_shrinks():
    transform = make_transform(min_size=None, max_size=150)
    batch, _ = transform([torch.rand(3, 100, 300), torch.rand(3, 20, 30)])
    assert batch.image_sizes.tolist() == [[50, 150], [20, 30]]


def test_fixed_canvas():
    transform = make_transform(min_size=None, max_size=None, fixed_canvas=(128, 160))
    batch, _ = transform([torch.rand(3, 100, 150), torch.rand(3, 20, 30)])
    assert batch.tensor.shape == (2, 3, 128, 160)
    with pytest.raises(ValueError, match=r"170x30 after resize"):
        transform([torch.rand(3, 20, 30), torch.rand(3, 170, 30)])
    with pytest.raises(ValueError, match="multiple of size_divisible"):
        make_transform(fixed_canvas=(800, 1066))


def test_fixed_canvas_follows_the_orientation_of_the_batch():
    """The seed preset's 800x1088 canvas with COCO's portrait images: 480x640 resizes to 1066x799 (portrait)."""
    transform = make_transform(min_size=800, max_size=1066, fixed_canvas=(800, 1088))
    landscape, portrait = torch.rand(3, 480, 640), torch.rand(3, 640, 480)
    batch, _ = transform([landscape, landscape])
    assert batch.image_sizes.tolist() == [[799, 1066]] * 2 and batch.tensor.shape[-2:] == (800, 1088)
    batch, _ = transform([portrait, portrait])
    assert batch.image_sizes.tolist() == [[1066, 799]] * 2 and batch.tensor.shape[-2:] == (1088, 800)
    batch, _ = transform([landscape, portrait])  # inference batches may mix them: the square holds both
    assert batch.tensor.shape[-2:] == (1088, 1088)
    assert torch.equal(batch.tensor[1, :, 1066:], torch.zeros(3, 22, 1088))  # padded below the portrait image


def test_training_targets_boxes_scaled_masks_untouched():
    transform = make_transform(min_size=50, max_size=1000).train()
    masks = torch.zeros(1, 100, 200, dtype=torch.uint8)
    target = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0]]), "labels": torch.tensor([1]), "masks": masks}
    batch, targets = transform([torch.rand(3, 100, 200)], [target])
    assert batch.image_sizes.tolist() == [[50, 100]]
    assert targets[0]["boxes"].tolist() == [[5.0, 10.0, 15.0, 20.0]]
    assert targets[0]["masks"] is masks
    assert target["boxes"].tolist() == [[10.0, 20.0, 30.0, 40.0]]  # the caller's dict is not modified
    # eval mode ignores targets
    _, none = transform.eval()([torch.rand(3, 100, 200)], [target])
    assert none is None


def test_boxes_to_original_round_trip():
    transform = make_transform(min_size=64, max_size=1000).train()
    images = [torch.rand(3, 30, 45), torch.rand(3, 50, 37)]
    boxes = [torch.tensor([[1.0, 2.0, 44.0, 29.0]]), torch.tensor([[3.5, 7.25, 20.0, 49.0]])]
    batch, targets = transform(images, [{"boxes": b} for b in boxes])
    # short sides to 64: 30x45 x2.133 -> 64 x 96; 50x37 x1.730 -> floor(86.49) x 64
    assert batch.image_sizes.tolist() == [[64, 96], [86, 64]]
    resized = torch.stack([t["boxes"] for t in targets])  # (B, 1, 4)
    back = transform.boxes_to_original(resized, batch)
    torch.testing.assert_close(back, torch.stack(boxes))
    # the inverse uses the actual per-dimension ratios: y of image 1 goes back by 50 / 86, not by 37 / 64
    assert back.shape == (2, 1, 4)
    unit = transform.boxes_to_original(torch.ones(2, 1, 4), batch)
    torch.testing.assert_close(unit[1, 0], torch.tensor([37 / 64, 50 / 86, 37 / 64, 50 / 86]))


def test_bad_images_are_named():
    transform = make_transform()
    with pytest.raises(TypeError, match="image 1"):
        transform([torch.rand(3, 10, 10), torch.zeros(3, 10, 10, dtype=torch.uint8)])
    with pytest.raises(ValueError, match=r"image 0 must be \[3, H, W\]"):
        transform([torch.rand(1, 10, 10)])


def test_a_batch_tensor_is_prepared_as_the_list_of_its_images():
    transform = make_transform(min_size=64, max_size=1000, fixed_canvas=(96, 128))
    images = torch.rand(2, 3, 30, 45)
    from_tensor, _ = transform(images)
    from_list, _ = transform(list(images))
    assert torch.equal(from_tensor.tensor, from_list.tensor) and from_tensor.tensor.shape == (2, 3, 96, 128)
    assert from_tensor.image_sizes.tolist() == from_list.image_sizes.tolist() == [[64, 96]] * 2
    assert from_tensor.original_sizes.tolist() == [[30, 45]] * 2
    # training: one target per image of the tensor, boxes scaled by 64 / 30 and 96 / 45
    _, targets = transform.train()(images, [{"boxes": torch.tensor([[0.0, 0.0, 45.0, 30.0]])}] * 2)
    for target in targets:
        torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0.0, 96.0, 64.0]]))

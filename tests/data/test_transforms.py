import pytest
import torch

from maskrcnn.config import ConfigError, DataConfig, load_config
from maskrcnn.data import build_dataset, train_transform
from maskrcnn.data.common import masks_to_boxes
from maskrcnn.data.transforms import (
    ColourJitter, Compose, CopyPaste, CopyPasteDataset, LargeScaleJitter, RandomHorizontalFlip, ResizeShortestEdge,
    keep_visible_instances,
)


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


def rect_masks(height, width, rects):
    """u8[N, H, W] masks of the rectangles (y1, y2, x1, x2), end-exclusive."""
    masks = torch.zeros(len(rects), height, width, dtype=torch.uint8)
    for mask, (y1, y2, x1, x2) in zip(masks, rects):
        mask[y1:y2, x1:x2] = 1
    return masks


def target_of(masks, labels):
    return {"boxes": masks_to_boxes(masks), "labels": torch.tensor(labels), "masks": masks, "image_id": 3}


def paste_case(source_scale=1):
    """A black 6x6 destination with A (rows 1-2, cols 1-2, label 1) and B (rows 4-5, all cols, label 2); a white
    source whose one instance S (label 3) covers cols 0-2 of every row, so that it hides all of A and half of B."""
    destination = torch.zeros(3, 6, 6, dtype=torch.uint8), target_of(rect_masks(6, 6, [(1, 3, 1, 3), (4, 6, 0, 6)]),
                                                                      [1, 2])
    size = 6 * source_scale
    source = (torch.full((3, size, size), 255, dtype=torch.uint8),
              target_of(rect_masks(size, size, [(0, size, 0, 3 * source_scale)]), [3]))
    return destination, source


@pytest.mark.parametrize("source_scale", [1, 2])  # 2: a 12x12 source is first resized to the destination's 6x6
def test_copy_paste_removes_covered_instance_and_boxes_follow_masks(source_scale):
    destination, source = paste_case(source_scale)
    image, target = CopyPaste(min_pixels=1, instance_prob=1.0)(destination, source)
    assert target["labels"].tolist() == [2, 3]  # A was fully covered: gone
    assert target["boxes"].tolist() == [[3, 4, 6, 6], [0, 0, 3, 6]]  # B keeps cols 3-5 of rows 4-5; S whole
    assert target["masks"][0].sum() == 6 and target["masks"][1].sum() == 18
    assert (image[:, :, :3] == 255).all() and (image[:, :, 3:] == 0).all()
    assert target["image_id"] == 3 and target["masks"].dtype == torch.uint8
    assert destination[1]["masks"][0].sum() == 4  # the inputs are not modified


def test_copy_paste_drops_tiny_remnants_and_may_paste_nothing():
    destination, source = paste_case()
    _, target = CopyPaste(min_pixels=7, instance_prob=1.0)(destination, source)
    assert target["labels"].tolist() == [3]  # B's 6-pixel remnant is under 7
    image, same = CopyPaste(instance_prob=0.0)(destination, source)
    assert image is destination[0] and same is destination[1]


def test_keep_visible_instances_by_hand():
    masks = rect_masks(4, 4, [(0, 1, 0, 1), (1, 3, 2, 4), (0, 0, 0, 0)])  # 1, 4 and 0 pixels
    target = {"boxes": torch.zeros(3, 4), "labels": torch.tensor([1, 2, 3]), "masks": masks}
    assert keep_visible_instances(target, 1)["boxes"].tolist() == [[0, 0, 1, 1], [2, 1, 4, 3]]
    assert keep_visible_instances(target, 2)["labels"].tolist() == [2]


def coordinate_image(size):
    """uint8[3, size, size] whose channel 0 is 10 x row and channel 1 is 10 x column: a crop shows its offset."""
    rows = torch.arange(size).repeat_interleave(size).reshape(size, size) * 10
    return torch.stack([rows, rows.T, torch.zeros_like(rows)]).to(torch.uint8)


def test_jitter_crop_moves_boxes_and_drops_instances_left_empty():
    rects = [(0, 2, 0, 2), (5, 8, 3, 7), (2, 6, 2, 6)]  # top-left corner, bottom, centre of an 8x8 image
    image, target = coordinate_image(8), target_of(rect_masks(8, 8, rects), [1, 2, 3])
    jitter = LargeScaleJitter(canvas=(4, 4), scale_range=(2.0, 2.0))  # 2 x fitting into 4x4: the image stays 8x8
    seen_counts = set()
    for seed in range(12):
        torch.manual_seed(seed)
        cropped, out = jitter(image, target)
        assert cropped.shape == (3, 4, 4)
        top, left = cropped[0, 0, 0].item() // 10, cropped[1, 0, 0].item() // 10
        expected_boxes, expected_labels = [], []
        for label, (y1, y2, x1, x2) in enumerate(rects, start=1):
            box = [max(x1 - left, 0), max(y1 - top, 0), min(x2 - left, 4), min(y2 - top, 4)]
            if box[0] < box[2] and box[1] < box[3]:  # some pixels inside the crop
                expected_boxes.append(box)
                expected_labels.append(label)
        assert out["boxes"].tolist() == expected_boxes and out["labels"].tolist() == expected_labels
        seen_counts.add(len(expected_labels))
    assert len(seen_counts) > 1  # some crops dropped an instance, others kept it


def test_jitter_pads_a_shrunk_image_with_grey():
    image = torch.full((3, 8, 8), 255, dtype=torch.uint8)
    target = target_of(rect_masks(8, 8, [(0, 8, 0, 8)]), [1])
    torch.manual_seed(0)
    padded, out = LargeScaleJitter(canvas=(8, 8), scale_range=(0.5, 0.5))(image, target)  # 4x4 inside 8x8
    x1, y1, x2, y2 = (int(v) for v in out["boxes"][0])
    assert (x2 - x1, y2 - y1) == (4, 4) and out["masks"][0].sum() == 16
    assert (padded[:, y1:y2, x1:x2] == 255).all() and (padded == 128).sum() == 3 * (64 - 16)


@pytest.mark.parametrize("seed", range(4))
def test_flip_and_jitter_keep_boxes_at_mask_extents(seed):
    generator = torch.Generator().manual_seed(seed)
    masks = (torch.rand(3, 20, 30, generator=generator) > 0.7).to(torch.uint8)
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8, generator=generator)
    torch.manual_seed(seed)
    augment = Compose([RandomHorizontalFlip(0.5), LargeScaleJitter((24, 24), (0.3, 2.0), min_pixels=3),
                       ColourJitter(0.4)])
    out_image, out = augment(image, target_of(masks, [1, 2, 3]))
    assert out_image.shape == (3, 24, 24) and out_image.dtype == torch.uint8
    assert out["masks"].shape[1:] == (24, 24) and len(out["labels"]) == len(out["masks"]) == len(out["boxes"])
    assert (out["masks"].flatten(1).sum(1) >= 3).all()
    assert torch.equal(out["boxes"], masks_to_boxes(out["masks"]))


def test_colour_jitter_changes_the_image_only():
    image, target = sample()
    torch.manual_seed(0)
    jittered, out = ColourJitter(0.4)(image, target)
    assert out is target and jittered.shape == image.shape and jittered.dtype == torch.uint8
    assert not torch.equal(jittered, image)
    with pytest.raises(ValueError):
        ColourJitter(0.0)


class TwoImages(torch.utils.data.Dataset):
    """Sample 0 of `paste_case` as the destination, its source as sample 1."""

    class_names = ("thing",)

    def __init__(self):
        destination, source = paste_case()
        self.samples = [destination, source]

    def __len__(self):
        return 2

    def image_size(self, index):
        return 6, 6

    def __getitem__(self, index):
        return self.samples[index]


def test_copy_paste_dataset_pastes_from_another_sample():
    pasted = CopyPasteDataset(TwoImages(), CopyPaste(instance_prob=1.0), prob=1.0)
    image, target = pasted[0]  # the one other sample is 1
    assert target["labels"].tolist() == [2, 3] and (image[:, :, :3] == 255).all()
    assert len(pasted) == 2 and pasted.image_size(1) == (6, 6) and pasted.class_names == ("thing",)
    unchanged = CopyPasteDataset(TwoImages(), CopyPaste(instance_prob=1.0), prob=0.0)
    assert unchanged[0][1]["labels"].tolist() == [1, 2]


def test_augmentations_are_off_unless_configured():
    assert isinstance(train_transform(DataConfig()), RandomHorizontalFlip)  # the defaults: a flip, as before
    assert train_transform(DataConfig(flip_prob=0.0)) is None
    on = DataConfig(format="synthetic", synthetic_train_size=2, large_scale_jitter=True, jitter_canvas=(64, 64),
                    colour_jitter=0.2, copy_paste_prob=0.5)
    steps = train_transform(on).transforms
    assert [type(step) for step in steps] == [RandomHorizontalFlip, LargeScaleJitter, ColourJitter]
    assert isinstance(build_dataset(on, "train"), CopyPasteDataset)
    assert build_dataset(on, "val").transform is None
    image, target = build_dataset(on, "train")[1]
    assert image.shape == (3, 64, 64) and torch.equal(target["boxes"], masks_to_boxes(target["masks"]))
    with pytest.raises(ConfigError, match="data.jitter_scale_range"):
        load_config(None, ["data.jitter_scale_range=[2.0,1.0]"])

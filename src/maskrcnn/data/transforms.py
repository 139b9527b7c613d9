"""Paired image + target transforms: every transform maps (image, target) -> (image, target) and keeps the
image, its boxes and its masks consistent.

Shape letters: N objects, P objects pasted from another image, H/W image size before, H'/W' after the transform.
Images are uint8[3, H, W]; targets follow the data convention (boxes f32[N, 4] xyxy px, labels i64[N],
masks u8[N, H, W], image_id). Transforms return new tensors and never modify their inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from maskrcnn.data.common import masks_to_boxes

Sample = tuple[Tensor, dict]


class Compose:
    """Applies transforms in order.

    Args:
        transforms: callables (image, target) -> (image, target).
    """

    def __init__(self, transforms: Sequence[Callable[[Tensor, dict], Sample]]):
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: dict) -> Sample:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class RandomHorizontalFlip:
    """Mirrors image, boxes and masks left-right with probability `p`.

    The coin is drawn from torch's global generator, which the DataLoader seeds per worker.

    Args:
        p: flip probability in [0, 1].
    """

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: Tensor, target: dict) -> Sample:
        if self.p == 0.0 or (self.p < 1.0 and torch.rand(()).item() >= self.p):
            return image, target
        width = image.shape[-1]
        target = dict(target)
        boxes = target["boxes"]
        # Pixel-edge coordinates: column x maps to W - x, so x1' = W - x2 and x2' = W - x1.
        target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return image.flip(-1), target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def resize(image: Tensor, target: dict, size: tuple[int, int]) -> Sample:
    """(image, target) resized to size = (H', W'): the image bilinearly with antialiasing; masks with 'nearest-exact'
    (the source pixel whose centre is nearest), so every resized mask pixel centre lies inside the scaled box of its
    object; boxes are scaled."""
    height, width = image.shape[-2:]
    new_h, new_w = size
    resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", antialias=True,
                            align_corners=False)  # (1, 3, H, W) -> (1, 3, H', W')
    image = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    target = dict(target)
    scale = torch.tensor([new_w / width, new_h / height, new_w / width, new_h / height])
    target["boxes"] = target["boxes"] * scale
    if "masks" in target:
        masks = target["masks"]
        if masks.shape[0]:
            # interpolate needs a float (N, 1, H, W) input; 0/1 values survive nearest sampling exactly.
            masks = F.interpolate(masks[:, None].float(), size=(new_h, new_w), mode="nearest-exact")
            masks = masks[:, 0].to(torch.uint8)  # (N, 1, H', W') -> (N, H', W')
        else:
            masks = masks.new_zeros((0, new_h, new_w))
        target["masks"] = masks
    return image, target


class ResizeShortestEdge:
    """Resizes so that the shorter side is `min_size`, unless the longer side would then exceed `max_size`, in
    which case the longer side becomes `max_size` (the rule of torchvision and detectron2).

    Images are resampled bilinearly with antialiasing; masks with 'nearest-exact' (the source pixel whose centre is
    nearest), so every resized mask pixel centre lies inside the scaled box of its object; boxes are scaled.

    Args:
        min_size: target length of the shorter side, pixels.
        max_size: cap on the longer side, pixels; None: no cap.
    """

    def __init__(self, min_size: int, max_size: int | None = None):
        if min_size < 1 or (max_size is not None and max_size < min_size):
            raise ValueError(f"need 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') for an input of (height, width)."""
        scale = self.min_size / min(height, width)
        if self.max_size is not None and max(height, width) * scale > self.max_size:
            scale = self.max_size / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def __call__(self, image: Tensor, target: dict) -> Sample:
        size = self.output_size(*image.shape[-2:])
        return (image, target) if size == tuple(image.shape[-2:]) else resize(image, target, size)

    def __repr__(self) -> str:
        return f"ResizeShortestEdge(min_size={self.min_size}, max_size={self.max_size})"


def keep_visible_instances(target: dict, min_pixels: int) -> dict:
    """`target` without the instances whose masks keep fewer than `min_pixels` pixels, and with every box set to
    its mask's extent: after a crop or a paste the old box no longer describes what is left of an object.

    Args:
        target: boxes f32[N, 4], labels i64[N], masks u8[N, H, W] (other keys are kept as they are).
        min_pixels: smallest mask area kept, pixels (at least 1: an empty mask has no box).
    Returns:
        a new target with N' <= N instances.
    """
    masks = target["masks"]
    keep = masks.flatten(1).sum(1) >= max(1, min_pixels)  # (N, H, W) -> (N, H*W) -> (N,)
    target = dict(target)
    target["masks"] = masks[keep]
    target["labels"] = target["labels"][keep]
    target["boxes"] = masks_to_boxes(target["masks"])
    return target


class LargeScaleJitter:
    """Large-scale jitter (Ghiasi et al., "Simple Copy-Paste", CVPR 2021, section 3): resizes the image so that it
    fits into `canvas` times a random factor from `scale_range` (aspect ratio kept), then crops a random `canvas`-sized
    window, padding with grey where the resized image is smaller. Instances with fewer than `min_pixels` mask pixels
    left are dropped and boxes become the extents of what is left of their masks.

    torchvision's transforms.v2 `ScaleJitter` + `RandomCrop` move image and masks together (image bilinear with
    antialiasing, masks nearest); the coin flips come from torch's global generator, which the data loader seeds per
    sample.

    Args:
        canvas: (H, W) of every output image, pixels.
        scale_range: (low, high) of the resize factor relative to fitting the image into the canvas.
        min_pixels: smallest mask area an instance keeps after the crop, pixels.
    """

    def __init__(self, canvas: tuple[int, int], scale_range: tuple[float, float] = (0.1, 2.0), min_pixels: int = 1):
        if min(canvas) < 1 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"need a canvas of at least 1x1 px and 0 < low <= high scale, got canvas={canvas}, "
                             f"scale_range={scale_range}")
        self.canvas = tuple(canvas)
        self.scale_range = tuple(scale_range)
        self.min_pixels = min_pixels
        height, width = canvas
        # 128 is mid-grey: the zero of the normalised input for the Lite weights, near the ImageNet mean for ResNets
        fill = {tv_tensors.Image: 128, tv_tensors.Mask: 0, "others": 0}
        self._jitter = v2.Compose([
            v2.ScaleJitter(target_size=(width, height), scale_range=self.scale_range),  # ScaleJitter reads (W, H)
            v2.RandomCrop((height, width), pad_if_needed=True, fill=fill),
        ])

    def __call__(self, image: Tensor, target: dict) -> Sample:
        # The boxes do not go through the transform: a crop clamps a box to the window, which is not the extent of
        # what the window leaves of a non-rectangular mask; they are recomputed from the masks instead.
        jittered, masks = self._jitter(tv_tensors.Image(image), tv_tensors.Mask(target["masks"]))
        target = dict(target)
        target["masks"] = masks.as_subclass(Tensor)
        return jittered.as_subclass(Tensor), keep_visible_instances(target, self.min_pixels)

    def __repr__(self) -> str:
        return f"LargeScaleJitter(canvas={self.canvas}, scale_range={self.scale_range}, min_pixels={self.min_pixels})"


class ColourJitter:
    """Photometric jitter of the image alone (boxes and masks do not move): brightness, contrast and saturation each
    scaled by a random factor in [1 - strength, 1 + strength], hue shifted by up to strength / 4 of the colour
    circle (0.4 gives the common ColorJitter(0.4, 0.4, 0.4, 0.1)), in a random order: transforms.v2 `ColorJitter`.

    Args:
        strength: in (0, 1].
    """

    def __init__(self, strength: float):
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"colour jitter strength must be in (0, 1], got {strength}")
        self.strength = strength
        self._jitter = v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength, hue=strength / 4)

    def __call__(self, image: Tensor, target: dict) -> Sample:
        return self._jitter(tv_tensors.Image(image)).as_subclass(Tensor), target

    def __repr__(self) -> str:
        return f"ColourJitter(strength={self.strength})"


class CopyPaste:
    """Simple copy-paste (Ghiasi et al., CVPR 2021): a random subset of the instances of a source image is pasted
    onto a destination image through their masks. What the pasted pixels cover is removed from the destination's
    masks; destination instances left with fewer than `min_pixels` pixels are dropped (fully covered ones among
    them), and every box becomes its mask's extent.

    transforms.v2 has no copy-paste: it works on one sample, this needs two. A source of another size is first
    resized to the destination's (bilinear image, nearest masks); with large-scale jitter both already share the
    canvas, as in the paper.

    Args:
        min_pixels: smallest mask area a destination instance keeps, pixels.
        instance_prob: probability that each source instance is pasted.
    """

    def __init__(self, min_pixels: int = 1, instance_prob: float = 0.5):
        if not 0.0 <= instance_prob <= 1.0:
            raise ValueError(f"copy-paste instance probability must be in [0, 1], got {instance_prob}")
        self.min_pixels = min_pixels
        self.instance_prob = instance_prob

    def __call__(self, destination: Sample, source: Sample) -> Sample:
        image, target = destination
        source_image, source_target = source
        pasted = torch.rand(source_target["masks"].shape[0]) < self.instance_prob
        if not pasted.any():
            return image, target
        if source_image.shape[-2:] != image.shape[-2:]:
            source_image, source_target = resize(source_image, source_target, tuple(image.shape[-2:]))
        source_masks = source_target["masks"][pasted]  # (P, H, W)
        covered = source_masks.bool().any(0)  # (P, H, W) -> (H, W)
        merged = dict(target)
        merged["masks"] = torch.cat([target["masks"] * ~covered, source_masks])  # (N + P, H, W), uint8 kept
        merged["labels"] = torch.cat([target["labels"], source_target["labels"][pasted]])
        pasted_image = torch.where(covered, source_image, image)  # (3, H, W): the mask broadcast over channels
        return pasted_image, keep_visible_instances(merged, self.min_pixels)

    def __repr__(self) -> str:
        return f"CopyPaste(min_pixels={self.min_pixels}, instance_prob={self.instance_prob})"


class CopyPasteDataset(Dataset):
    """A training data set whose every sample, with probability `prob`, receives instances pasted from another
    sample of the same data set drawn at random (`CopyPaste`; both samples carry their own augmentations).

    The partner is drawn here, per sample, rather than taken from the other images of a collated batch: at the
    preset's batch of 2 a batch offers each image one partner (and a batch of 1 none), while here any of the training
    images can be one; the draw uses the generator the loader seeds per sample, so a run stays the same with any
    number of workers and when resumed; and the cost, one more image read and transform per sample (milliseconds),
    is small beside a training step (seconds on a CPU). The paste itself is tensor code over all pasted instances.

    Args:
        dataset: a data set of this package (samples (image, target); `class_names`, `image_size`).
        copy_paste: the paste of one sample onto another.
        prob: probability that a sample receives a paste, in [0, 1].
    """

    def __init__(self, dataset: Dataset, copy_paste: CopyPaste, prob: float):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"copy-paste probability must be in [0, 1], got {prob}")
        self.dataset = dataset
        self.copy_paste = copy_paste
        self.prob = prob
        self.class_names = dataset.class_names
        self.label_to_category_id = getattr(dataset, "label_to_category_id", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def image_size(self, index: int) -> tuple[int, int]:
        """(h, w) of sample `index` before augmentation (the orientation the loader groups by)."""
        return self.dataset.image_size(index)

    def __getitem__(self, index: int) -> Sample:
        sample = self.dataset[index]
        if len(self.dataset) < 2 or torch.rand(()).item() >= self.prob:
            return sample
        partner = int(torch.randint(len(self.dataset) - 1, ()))
        partner += partner >= index  # any sample but this one
        return self.copy_paste(sample, self.dataset[partner])

    def __repr__(self) -> str:
        return f"CopyPasteDataset({self.dataset!r}, {self.copy_paste!r}, prob={self.prob})"

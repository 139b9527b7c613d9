"""Synthetic shapes: images generated on the fly with exact instance masks, the embedded default data set.

Every image is a function of (seed, split, index) alone, so any worker, any epoch and any machine produces the same
pixels without storing anything. Up to `max_objects` shapes are painted over a textured, noisy background; later
shapes are drawn on top of earlier ones and the masks are the VISIBLE parts. Classes differ by shape (not by colour,
which is random), so a detector has to learn geometry.

Shape letters: N objects, H/W image size.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from maskrcnn.data.common import masks_to_boxes

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
_SPLIT_STREAM = {"train": 0, "val": 1}
MIN_VISIBLE_FRACTION = 0.2  # an object occluded to less than this fraction of its area is not painted nor labelled
MIN_CONTRAST = 120  # L1 distance (0..765) between an object's colour and its background / the shapes below it


def _shape_mask(kind: str, dx: np.ndarray, dy: np.ndarray, r: float, flip: bool) -> np.ndarray:
    """bool[H, W]: pixel centres inside a shape of half-size r, given their offsets dx [1, W], dy [H, 1] from its
    centre."""
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if kind == "triangle":
        dy = -dy if flip else dy  # apex up, or down when flipped
        return (dy <= r) & (dy >= 2.0 * np.abs(dx) - r)
    if kind == "cross":
        thin = r / 3.0
        return ((np.abs(dx) <= r) & (np.abs(dy) <= thin)) | ((np.abs(dx) <= thin) & (np.abs(dy) <= r))
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    raise ValueError(f"unknown shape {kind!r}")


class SyntheticShapes(Dataset):
    """Procedurally generated shapes with exact visible-part masks.

    Args:
        num_images: length of the data set.
        image_size: (H, W) of every image.
        num_classes: K, the first K of `SHAPES` ("circle", "square", "triangle", "cross", "diamond").
        seed: base seed; an image is determined by (seed, split, index).
        split: "train" or "val"; the two draw from different random streams.
        max_objects: each image has 1..max_objects shapes before occlusion drops the hidden ones.
        size_range: shape extent as a fraction of the shorter image side.
        transform: optional paired transform applied to (image, target).
    """

    def __init__(self, *, num_images: int, image_size: tuple[int, int] = (128, 128), num_classes: int = 3,
                 seed: int = 0, split: str = "train", max_objects: int = 4,
                 size_range: tuple[float, float] = (0.15, 0.5),
                 transform: Callable[[Tensor, dict], tuple[Tensor, dict]] | None = None):
        if not 1 <= num_classes <= len(SHAPES):
            raise ValueError(f"synthetic num_classes must be 1..{len(SHAPES)}, got {num_classes}")
        if split not in _SPLIT_STREAM:
            raise ValueError(f"synthetic split must be 'train' or 'val', got {split!r}")
        height, width = image_size
        if num_images < 0 or height < 8 or width < 8 or max_objects < 1:
            raise ValueError(f"need num_images >= 0, image sides >= 8 and max_objects >= 1, "
                             f"got {num_images}, {image_size}, {max_objects}")
        self.num_images = num_images
        self.height, self.width = height, width
        self.class_names = list(SHAPES[:num_classes])
        self.seed = seed
        self.split = split
        self.max_objects = max_objects
        self.size_range = size_range
        self.transform = transform
        # Pixel-centre coordinates, shared by every image.
        self._ys = np.arange(height, dtype=np.float32)[:, None] + 0.5  # [H, 1]
        self._xs = np.arange(width, dtype=np.float32)[None, :] + 0.5  # [1, W]

    def __len__(self) -> int:
        return self.num_images

    def image_size(self, index: int) -> tuple[int, int]:
        return self.height, self.width

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """f32[H, W, 3]: a two-colour linear gradient plus a faint sinusoidal texture."""
        colours = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
        angle, phase = rng.uniform(0, 2 * np.pi, size=2)
        xs, ys = self._xs / self.width, self._ys / self.height
        ramp = np.clip(0.5 + (xs - 0.5) * np.cos(angle) + (ys - 0.5) * np.sin(angle), 0.0, 1.0)  # [H, W]
        frequency = rng.uniform(2, 8, size=2)
        texture = rng.uniform(5, 20) * np.sin(2 * np.pi * (xs * frequency[0] + ys * frequency[1]) + phase)
        return colours[0] + (colours[1] - colours[0]) * ramp[..., None] + texture[..., None]

    def _pick_colour(self, rng: np.random.Generator, avoid: list[np.ndarray]) -> np.ndarray:
        """A random colour at least MIN_CONTRAST (L1) from every colour in `avoid`, so that edges stay visible."""
        for _ in range(32):
            colour = rng.uniform(0, 255, size=3).astype(np.float32)
            if all(np.abs(colour - other).sum() >= MIN_CONTRAST for other in avoid):
                return colour
        return colour

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"synthetic index {index} out of range 0..{self.num_images - 1}")
        rng = np.random.default_rng([self.seed, _SPLIT_STREAM[self.split], index])
        image = self._background(rng)
        side = min(self.height, self.width)
        num_objects = int(rng.integers(1, self.max_objects + 1))
        kinds = rng.integers(0, len(self.class_names), size=num_objects)
        sizes = rng.uniform(*self.size_range, size=num_objects) * side
        centres_x = rng.uniform(sizes / 2, self.width - sizes / 2)
        centres_y = rng.uniform(sizes / 2, self.height - sizes / 2)
        flips = rng.random(num_objects) < 0.5
        full = [_shape_mask(SHAPES[k], self._xs - cx, self._ys - cy, s / 2, f)
                for k, s, cx, cy, f in zip(kinds, sizes, centres_x, centres_y, flips)]

        # Top-down pass: a shape hidden below MIN_VISIBLE_FRACTION is dropped and painted nowhere, so it covers
        # nothing and the visible masks of the shapes below it stay exact.
        covered = np.zeros((self.height, self.width), dtype=bool)
        kept, visible = [], []
        for i in reversed(range(num_objects)):
            area = full[i].sum()
            seen = full[i] & ~covered
            if area == 0 or seen.sum() < MIN_VISIBLE_FRACTION * area:
                continue
            kept.append(i)
            visible.append(seen)
            covered |= full[i]
        kept.reverse()
        visible.reverse()

        colours: list[np.ndarray] = []
        for i in kept:
            cy = min(int(centres_y[i]), self.height - 1)
            cx = min(int(centres_x[i]), self.width - 1)
            colour = self._pick_colour(rng, [image[cy, cx]] + colours)
            image[full[i]] = colour
            colours.append(colour)
        image += rng.normal(0.0, rng.uniform(2, 10), size=image.shape).astype(np.float32)
        image_t = torch.from_numpy(np.clip(image, 0, 255).astype(np.uint8)).permute(2, 0, 1)  # (H,W,3)->(3,H,W)

        masks = torch.from_numpy(np.stack(visible).astype(np.uint8)) if kept else torch.zeros(
            (0, self.height, self.width), dtype=torch.uint8)  # [N, H, W]
        target = {
            "boxes": masks_to_boxes(masks),
            "labels": torch.as_tensor(kinds[kept] + 1, dtype=torch.int64),
            "masks": masks,
            "image_id": index,
        }
        if self.transform is not None:
            image_t, target = self.transform(image_t, target)
        return image_t, target

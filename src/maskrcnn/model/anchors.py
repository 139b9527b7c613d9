"""Anchors of the region proposal network (Faster R-CNN sec. 3.1.1, FPN sec. 4.1): one size per pyramid level,
several aspect ratios at every location.

Numerics are torchvision's `AnchorGenerator` exactly (so converted torchvision weights propose the same boxes):
base anchors centred on 0 and rounded to whole pixels, shifted by `location * stride` where the stride of a level
is `canvas // feature size` (integer division, also for p6, whose size is a ceil of p5's).

Shape letters: L pyramid levels, Hi/Wi height/width of level i, A anchors per location (= aspect ratios),
Hp/Wp padded batch canvas.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

# distinct (canvas, feature sizes, device, dtype) keys kept; with a fixed canvas or few batch shapes one suffices,
# the bound only stops a stream of ever-new image sizes from growing the cache without end
_CACHE_SIZE = 16


class AnchorGenerator:
    """Anchors for every location of every pyramid level, computed once per shape and shared by the batch.

    Args:
        sizes: one anchor size (sqrt of the area, pixels) per pyramid level, e.g. (32, 64, 128, 256, 512).
        aspect_ratios: anchor height / width ratios used at every level, e.g. (0.5, 1.0, 2.0).
    """

    def __init__(self, *, sizes: Sequence[float], aspect_ratios: Sequence[float]) -> None:
        if not sizes or not aspect_ratios:
            raise ValueError(f"AnchorGenerator: sizes {sizes} and aspect_ratios {aspect_ratios} must not be empty")
        self.sizes = tuple(sizes)
        self.aspect_ratios = tuple(aspect_ratios)
        self.cell_anchors = [self._cell_anchors(size) for size in self.sizes]  # L x f32[A, 4]
        self._cache: OrderedDict[tuple, list[Tensor]] = OrderedDict()

    @property
    def num_anchors_per_location(self) -> int:
        """A: anchors at every location of every level."""
        return len(self.aspect_ratios)

    def _cell_anchors(self, size: float) -> Tensor:
        """f32[A, 4] anchors of one level centred on (0, 0), rounded to whole pixels like torchvision's."""
        ratios = torch.as_tensor(self.aspect_ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        widths = w_ratios * size
        heights = h_ratios * size
        return (torch.stack([-widths, -heights, widths, heights], dim=1) / 2).round()

    def __call__(self, canvas_size: tuple[int, int], feature_sizes: Sequence[tuple[int, int]],
                 device: torch.device | str, dtype: torch.dtype = torch.float32) -> list[Tensor]:
        """Anchors of every level for a padded canvas.

        Args:
            canvas_size: (Hp, Wp) of the padded batch tensor.
            feature_sizes: L pairs (Hi, Wi), the spatial sizes of the pyramid levels, finest first.
            device, dtype: of the returned anchors (keep float32 for box arithmetic, also under autocast).
        Returns:
            L tensors f32[Hi*Wi*A, 4] xyxy in canvas pixels, ordered location-major (row, column) then anchor.
            Cached: treat them as read-only.
        """
        if len(feature_sizes) != len(self.sizes):
            raise ValueError(f"AnchorGenerator: {len(feature_sizes)} feature levels given but {len(self.sizes)} "
                             f"anchor sizes configured ({self.sizes})")
        feature_sizes = tuple(tuple(size) for size in feature_sizes)
        # sizes known only symbolically (torch.export traces one graph for every image size) are not cached
        cacheable = all(isinstance(s, int) for s in (*canvas_size, *(s for size in feature_sizes for s in size)))
        key = (tuple(canvas_size), feature_sizes, torch.device(device), dtype)
        anchors = self._cache.get(key) if cacheable else None
        if anchors is None:
            anchors = [self._grid_anchors(canvas_size, size, cell).to(device=device, dtype=dtype)
                       for size, cell in zip(feature_sizes, self.cell_anchors)]
            if cacheable:
                self._cache[key] = anchors
                if len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return anchors

    @staticmethod
    def _grid_anchors(canvas_size: tuple[int, int], feature_size: tuple[int, int], cell: Tensor) -> Tensor:
        """f32[Hi*Wi*A, 4]: `cell` (f32[A, 4]) shifted to every location of one level."""
        height, width = feature_size
        stride_y, stride_x = canvas_size[0] // height, canvas_size[1] // width
        shifts_x = torch.arange(width, dtype=torch.float32) * stride_x
        shifts_y = torch.arange(height, dtype=torch.float32) * stride_y
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")  # (Hi, Wi) each
        # flatten, not reshape(-1, ...): inferring -1 divides symbolic sizes, slow to trace for torch.export
        shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).flatten(0, 1)[:, None]  # (Hi*Wi, 1, 4)
        return (shifts + cell[None]).flatten(0, 1)  # (Hi*Wi, A, 4) -> (Hi*Wi*A, 4)

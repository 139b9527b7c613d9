"""Multi-level RoIAlign for FPN features (Lin et al. 2017, eq. 1), shared by the box head and the mask head.

Shape letters: B images, C channels, R RoIs of the whole batch, S pooled size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align as torchvision_roi_align

# roi_align(input f32[B, C, H, W], boxes f32[R, 5], output_size, spatial_scale=, sampling_ratio=, aligned=)
RoIAlignFn = Callable[..., Tensor]


def image_index_rois(image_index: Tensor, boxes: Tensor) -> Tensor:
    """(i64[R], f32[R, 4]) -> f32[R, 5] RoIs with the image index first, as `roi_align` takes them."""
    return torch.cat([image_index.to(boxes.dtype)[:, None], boxes], dim=1)


class LevelRoIAlign(nn.Module):
    """RoIAlign over FPN levels, each RoI pooled from the level that matches its size (FPN paper, eq. 1):
    k = floor(k0 + log2(sqrt(w * h) / canonical_size)), clamped to the available levels, with k0 = 4.

    Same level rule and epsilon as torchvision's `MultiScaleRoIAlign`, but with a configurable `aligned`
    (half-pixel-correct sampling, Detectron2) and one host sync for all levels (the level counts).

    Args:
        featmap_names: feature keys "p<k>", finest first; level k is pooled with spatial scale 2**-k.
        output_size: S, pooled height and width.
        sampling_ratio: sampling points per bin side (<= 0: adaptive, as roi_align).
        aligned: shift box coordinates by -0.5 px (True) or not (False, torchvision v1).
        canonical_size: side (square root of the area, canvas pixels) of the RoIs pooled from p4; 224 (the FPN
            paper's and torchvision's) for images of about 800 px; doubling it pools every RoI one level finer.
        roi_align: the kernel of one level, with `torchvision.ops.roi_align`'s signature (the default); the CPU
            speed layer (`cpu_speedups.optimize_for_cpu`) puts one that reads NHWC maps here.
    """

    def __init__(self, *, featmap_names: Sequence[str] = ("p2", "p3", "p4", "p5"), output_size: int,
                 sampling_ratio: int, aligned: bool, canonical_size: float = 224.0,
                 roi_align: RoIAlignFn = torchvision_roi_align) -> None:
        super().__init__()
        self.featmap_names = tuple(featmap_names)
        self.levels = [int(name.lstrip("p")) for name in self.featmap_names]
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.canonical_size = canonical_size
        self.roi_align = roi_align

    def assign_levels(self, boxes: Tensor) -> Tensor:
        """i64[R]: index into `featmap_names` of the level of every box f32[R, 4] (`canonical_size` at level 4)."""
        sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        # the 1e-6 keeps boxes of exactly canonical_size * 2**n on the upper level, as torchvision's LevelMapper
        level = torch.floor(4 + torch.log2(sizes / self.canonical_size) + torch.tensor(1e-6, dtype=sizes.dtype))
        level = level.clamp(min=self.levels[0], max=self.levels[-1])
        return level.to(torch.int64) - self.levels[0]

    def forward(self, features: dict[str, Tensor], rois: Tensor) -> Tensor:
        """Pools every RoI.

        Args:
            features: {"p2": f32[B, C, H2, W2], ...} at strides 2**k of the padded canvas.
            rois: f32[R, 5] (image index, x1, y1, x2, y2) in canvas pixels.
        Returns:
            f32[R, C, S, S], in the order of `rois`.
        """
        maps = [features[name] for name in self.featmap_names]
        level = self.assign_levels(rois[:, 1:])
        order = torch.argsort(level)  # RoIs grouped by level (their order inside a level does not matter)
        # the one host sync of the pooler (unbacked sizes when exported); a comparison, not bincount, whose CUDA
        # kernel reads the maximum first
        counts = (level[:, None] == torch.arange(len(maps), device=level.device)).sum(dim=0).tolist()
        pooled_sorted = torch.cat([  # (R, C, S, S) in level order; a level without RoIs pools an empty tensor
            self.roi_align(feature, rois_k, self.output_size, spatial_scale=2.0 ** -k,
                           sampling_ratio=self.sampling_ratio, aligned=self.aligned)
            for feature, k, rois_k in zip(maps, self.levels, rois[order].split(counts))])
        # back to the order of `rois`: row i of pooled_sorted is RoI order[i]. A copy to those rows rather than a
        # gather by the inverse permutation, whose backward is an accumulating scatter; the copy's backward is a
        # gather (CPU, 1024 x 256 x 7 x 7, forward + backward: 48 -> 17 ms)
        return torch.index_copy(torch.empty_like(pooled_sorted), 0, order, pooled_sorted)

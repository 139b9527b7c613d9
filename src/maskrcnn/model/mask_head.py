"""Mask head of Mask R-CNN (He et al. 2017, sec. 3 and fig. 4, right): RoIAlign 14x14, four 3x3 convs,
a 2x deconv and a per-class 1x1 conv to 28x28 logits; targets, loss and inference.

Shape letters: B images, R RoIs of the whole batch, N GT masks of the whole batch, K foreground classes,
C channels, S pooled size (14), M mask size (2 S = 28), Hm/Wm the largest original image of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from maskrcnn.model.poolers import LevelRoIAlign, image_index_rois

# Under cudnn.benchmark the RoI count is rounded up to a multiple of this: the count changes every training step,
# and cudnn tunes its convolutions again for every new shape (about half a second per new count in a profile of
# batch-8 training on an H200); rounded, it sees at most a few shapes per batch size
ROI_COUNT_MULTIPLE = 64


class MaskHead(nn.Module):
    """Predicts a 28x28 mask per RoI and class; only the channel of the RoI's class is used (sec. 3: the
    mask loss is defined on the GT class only, decoupling masks from classification).

    The predictor has K + 1 channels (background included, never used) so that torchvision's weights load
    unchanged. The 3x3 convs are `convs.<i>`, their norms `norms.<i>` (nn.Identity without a norm: no parameters,
    so the state dict of a head without norms is as it always was).

    Args:
        pooler: RoIAlign over the FPN levels (14x14).
        in_channels: C of the pooled features.
        conv_channels: channels of the 3x3 convs and of the deconv.
        num_convs: number of 3x3 convs (4).
        num_classes: K foreground classes.
        loss_weight: factor of the mask loss in the total loss (1 in the paper).
        norm_layer: normalisation after each 3x3 conv, e.g. nn.BatchNorm2d (torchvision v2); None: none, the convs
            have a bias.
    """

    def __init__(self, *, pooler: LevelRoIAlign, in_channels: int, conv_channels: int, num_convs: int,
                 num_classes: int, loss_weight: float = 1.0,
                 norm_layer: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        self.pooler = pooler
        self.num_classes = num_classes
        self.loss_weight = loss_weight
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if index == 0 else conv_channels, conv_channels, 3, padding=1,
                      bias=norm_layer is None) for index in range(num_convs))
        self.norms = nn.ModuleList(nn.Identity() if norm_layer is None else norm_layer(conv_channels)
                                   for _ in range(num_convs))
        self.deconv = nn.ConvTranspose2d(conv_channels, conv_channels, 2, stride=2)
        self.logits = nn.Conv2d(conv_channels, num_classes + 1, 1)
        for layer in [*self.convs, self.deconv]:  # torchvision's / Detectron2's init
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        # small predictor (Detectron2): logits start near 0, so the first mask loss is about log 2, not ~10
        nn.init.normal_(self.logits.weight, std=0.001)
        nn.init.zeros_(self.logits.bias)

    @property
    def mask_size(self) -> int:
        """M, the side of the predicted masks."""
        return 2 * self.pooler.output_size

    def forward(self, features: dict[str, Tensor], rois: Tensor, labels: Tensor) -> Tensor:
        """Mask logits of the given class of every RoI.

        Args:
            features: FPN maps {"p2".."p5"}.
            rois: f32[R, 5] (image index, x1, y1, x2, y2) in resized-image pixels.
            labels: i64[R] class 1..K of each RoI.
        Returns:
            f32[R, M, M] logits of the channel `labels`.
        """
        x = self.pooler(features, rois)  # (R, C, S, S)
        count = x.shape[0]
        # zero rows, cut off again below; not into a norm in training, whose batch statistics they would change
        batch_statistics = self.training and not all(isinstance(norm, nn.Identity) for norm in self.norms)
        if torch.backends.cudnn.benchmark and not batch_statistics:
            x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, -count % ROI_COUNT_MULTIPLE))  # (R, C, S, S) -> (R', C, S, S)
        # ReLU in place, as torchvision's heads: a conv's and a norm's backward need their input, not their output,
        # and at inference the largest map of the head (100 RoIs x 256 x 28 x 28 in float32: 80 MB) is not copied
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)), inplace=True)
        x = F.relu(self.deconv(x), inplace=True)  # (R', C, S, S) -> (R', C, M, M)
        logits = self.logits(x)[:count]  # (R, K+1, M, M)
        return logits[torch.arange(count, device=logits.device), labels]  # (R, M, M)

    @torch.no_grad()
    def targets(self, rois: Tensor, matched_gt: Tensor, gt_valid: Tensor, masks_per_image: Sequence[Tensor],
                scales: Tensor) -> Tensor:
        """Mask targets: the GT mask cut out inside each RoI, resampled to M x M and binarised at 0.5.

        One `roi_align` over the GT masks of the whole batch at their original resolution, so a target is
        the mask cropped to the proposal box (the original project resized the whole image mask instead).

        Args:
            rois: f32[R, 5] (image index, box) in resized-image pixels, the foreground RoIs.
            matched_gt: i64[R] index (into G) of the GT box each RoI is matched to, within its image.
            gt_valid: bool[B, G], valid GT rows first in every image (`pad_per_image`).
            masks_per_image: B tensors u8/bool[N_i, H_i, W_i], each at its image's original size.
            scales: f32[B, 2] (resized / original) for (y, x) of every image (`ImageBatch.scales`).
        Returns:
            f32[R, M, M] of 0 and 1.
        """
        image = rois[:, 0].to(torch.int64)
        # matched GT row -> row of the stacked masks of the whole batch: images in order, N_i rows each
        counts = gt_valid.sum(dim=1)  # (B,)
        first_row = torch.cumsum(counts, 0) - counts  # (B,)
        gt_masks = stack_masks(masks_per_image)  # (N, 1, Hm, Wm)
        scale_xyxy = scales[image][:, [1, 0, 1, 0]]  # (R, 2) -> (R, 4) as (x, y, x, y)
        boxes = rois[:, 1:] / scale_xyxy  # back to original-image pixels
        mask_rois = image_index_rois(first_row[image] + matched_gt, boxes)
        # adaptive sampling (ratio -1) averages over the whole bin: the target is the area covered at 0.5
        cut = roi_align(gt_masks.to(boxes.dtype), mask_rois, self.mask_size, spatial_scale=1.0,
                        sampling_ratio=-1, aligned=self.pooler.aligned)  # (R, 1, M, M)
        return (cut[:, 0] >= 0.5).to(boxes.dtype)

    def loss(self, mask_logits: Tensor, mask_targets: Tensor) -> Tensor:
        """`loss_weight` x the mean per-pixel binary cross-entropy of f32[R, M, M] logits; 0 connected to the graph
        when R = 0."""
        if mask_logits.shape[0] == 0:
            return mask_logits.sum() * 0.0
        return self.loss_weight * F.binary_cross_entropy_with_logits(mask_logits, mask_targets)


def stack_masks(masks_per_image: Sequence[Tensor]) -> Tensor:
    """GT masks of a batch in one tensor for `MaskHead.targets`.

    Args:
        masks_per_image: B tensors u8/bool[N_i, H_i, W_i] at the original image sizes.
    Returns:
        u8[sum N_i, 1, max H_i, max W_i], zero padded bottom / right, images in order.
    """
    height = max(m.shape[-2] for m in masks_per_image)
    width = max(m.shape[-1] for m in masks_per_image)
    total = sum(m.shape[0] for m in masks_per_image)
    stacked = masks_per_image[0].new_zeros((total, 1, height, width), dtype=torch.uint8)
    start = 0
    for masks in masks_per_image:  # uneven sizes: one copy per image
        stacked[start:start + masks.shape[0], 0, : masks.shape[-2], : masks.shape[-1]] = masks
        start += masks.shape[0]
    return stacked

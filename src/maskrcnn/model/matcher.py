"""IoU matching of reference boxes (anchors, proposals) to ground truth, and balanced sampling, for a whole batch.

Shape letters: B images, G ground-truth boxes per image (padded), A reference boxes per image (anchors or
proposals, padded). Matching returns two tensors (index and label) instead of labels packed into the index.
"""

from __future__ import annotations

import torch
from torch import Tensor

FOREGROUND, BACKGROUND, IGNORED = 1, 0, -1


class Matcher:
    """Assigns every reference box the GT box of highest IoU and a foreground / background / ignored label.

    Args:
        high_threshold: IoU >= this is foreground.
        low_threshold: IoU < this is background; between the two thresholds the box is ignored (-1).
        allow_low_quality_matches: also make foreground, for every GT box, each reference box tied for that
            GT's best IoU (Faster R-CNN sec. 3.1.2: a GT box that no anchor reaches 0.7 still gets an anchor).
            As in torchvision the box keeps its own best GT as `matched_idx`. A GT box that overlaps no
            reference box at all (best IoU 0) makes no low-quality matches.
    """

    def __init__(self, *, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool) -> None:
        if low_threshold > high_threshold:
            raise ValueError(f"Matcher: low_threshold {low_threshold} > high_threshold {high_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    @torch.no_grad()
    def __call__(self, iou: Tensor, gt_valid: Tensor) -> tuple[Tensor, Tensor]:
        """Matches a batch.

        Args:
            iou: f32[B, G, A] IoU of every GT box with every reference box (any value where invalid).
            gt_valid: bool[B, G], False for padded GT rows.
        Returns:
            matched_idx: i64[B, A] index (into G) of the matched GT box; 0 where no valid GT exists.
            match_label: i8[B, A] 1 foreground, 0 background, -1 ignored.
        """
        B, G, A = iou.shape
        if G == 0:
            return (torch.zeros((B, A), dtype=torch.int64, device=iou.device),
                    torch.zeros((B, A), dtype=torch.int8, device=iou.device))
        # padded GT rows get IoU -1 so they never win the max and always count as background
        iou = torch.where(gt_valid[:, :, None], iou, iou.new_tensor(-1.0))
        best_iou, matched_idx = iou.max(dim=1)  # (B, G, A) -> (B, A)
        foreground = best_iou >= self.high_threshold  # (B, A)
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=2, keepdim=True).values  # (B, G, A) -> (B, G, 1)
            tied = (iou == best_per_gt) & (best_per_gt > 0)  # invalid rows have best -1: never tied above 0
            foreground |= tied.any(dim=1)
        # where, not boolean-mask assignment: a mask index runs a nonzero, a host sync on CUDA
        background = torch.where(best_iou < self.low_threshold, BACKGROUND, IGNORED)
        match_label = torch.where(foreground, FOREGROUND, background).to(torch.int8)  # (B, A)
        # images without valid GT: every max is the padding value -1, index 0 by convention
        matched_idx = torch.where(best_iou >= 0, matched_idx, torch.zeros_like(matched_idx))
        return matched_idx, match_label


class BalancedSampler:
    """Samples a fixed budget of reference boxes per image with at most a given fraction of foreground.

    Batched: every candidate gets a uniform random key, and the top keys of each class are taken with one
    `topk` per class for the whole batch; per-image counts stay tensors (no host sync).

    Args:
        batch_size_per_image: boxes sampled per image (fewer when the image has fewer labelled boxes).
        positive_fraction: at most `int(batch_size_per_image * positive_fraction)` foreground boxes; the
            rest of the budget is filled with background, as torchvision does.
    """

    def __init__(self, *, batch_size_per_image: int, positive_fraction: float) -> None:
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    @staticmethod
    def _take_random(candidates: Tensor, count: Tensor, max_count: int) -> Tensor:
        """bool[B, A]: `count[b]` random entries among `candidates[b]` (all of them when fewer)."""
        B, A = candidates.shape
        k = min(max_count, A)
        keys = torch.where(candidates, torch.rand(candidates.shape, device=candidates.device), -1.0)
        top_keys, top_idx = keys.topk(k, dim=1)  # (B, A) -> (B, k), descending
        take = (top_keys >= 0) & (torch.arange(k, device=candidates.device) < count[:, None])
        chosen = torch.zeros_like(candidates)
        chosen.scatter_(1, top_idx, take)
        return chosen

    @torch.no_grad()
    def __call__(self, match_label: Tensor) -> tuple[Tensor, Tensor]:
        """Samples a batch.

        Args:
            match_label: i8[B, A] from `Matcher` (1 foreground, 0 background, -1 ignored or padding).
        Returns:
            positive: bool[B, A] sampled foreground boxes.
            negative: bool[B, A] sampled background boxes; never overlaps `positive`, never a -1 entry.
        """
        is_pos = match_label == FOREGROUND
        is_neg = match_label == BACKGROUND
        max_pos = int(self.batch_size_per_image * self.positive_fraction)
        num_pos = is_pos.sum(dim=1).clamp(max=max_pos)  # (B,)
        positive = self._take_random(is_pos, num_pos, max_pos)
        num_neg = self.batch_size_per_image - num_pos  # (B,)
        negative = self._take_random(is_neg, num_neg, self.batch_size_per_image)
        return positive, negative


def gather_matched(gt_values: Tensor, matched_idx: Tensor) -> Tensor:
    """Per reference box, the value of its matched GT row.

    Args:
        gt_values: [B, G, *rest] per GT box (e.g. boxes f32[B, G, 4]); G may be 0.
        matched_idx: i64[B, A] from `Matcher`.
    Returns:
        [B, A, *rest]; zeros when the batch has no GT at all (G = 0: nothing to gather, every box is background).
    """
    B, A = matched_idx.shape
    rest = gt_values.shape[2:]
    if gt_values.shape[1] == 0:
        return gt_values.new_zeros((B, A, *rest))
    index = matched_idx.view(B, A, *([1] * len(rest))).expand(B, A, *rest)  # (B, A) -> (B, A, *rest)
    return torch.gather(gt_values, 1, index)


def pairwise_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """IoU of every box of `boxes_a` with every box of `boxes_b`, per image of a batch.

    Same formula as `torchvision.ops.box_iou` (areas without +1), batched over the leading dimension.

    Args:
        boxes_a: f32[B, G, 4] xyxy.
        boxes_b: f32[B, A, 4] xyxy.
    Returns:
        f32[B, G, A]; 0 where the union is empty (degenerate padding boxes).
    """
    area_a = (boxes_a[..., 2] - boxes_a[..., 0]) * (boxes_a[..., 3] - boxes_a[..., 1])  # (B, G)
    area_b = (boxes_b[..., 2] - boxes_b[..., 0]) * (boxes_b[..., 3] - boxes_b[..., 1])  # (B, A)
    top_left = torch.maximum(boxes_a[:, :, None, :2], boxes_b[:, None, :, :2])  # (B, G, A, 2)
    bottom_right = torch.minimum(boxes_a[:, :, None, 2:], boxes_b[:, None, :, 2:])  # (B, G, A, 2)
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]  # (B, G, A)
    union = area_a[:, :, None] + area_b[:, None, :] - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(inter))

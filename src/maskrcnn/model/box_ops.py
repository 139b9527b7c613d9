"""Box operations shared by the RPN and the box head: clipping to the image, and the batched
"score filter -> NMS per group -> top-k per image" that turns scored candidates into padded outputs.

The selection keeps fixed shapes: the candidates stay on a [B, N] grid from start to end, NMS marks which of them
survive (`nms_mask`), and one `topk` per image picks the best survivors (`top_per_image`). The only data-dependent
size is the number of candidates that enter the NMS (one `nonzero`, which NMS needs anyway: a host sync on CUDA, an
unbacked size for torch.export, a NonZero for ONNX), so the same code runs eagerly and as an exported graph, but for
the NMS itself: torchvision's `batched_nms` eagerly, one NMS of the groups moved apart when exporting.

Shape letters: B images, N candidates per image, S candidates of the batch that enter the NMS, P kept per image.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

# score of a candidate that cannot be selected (scores are probabilities >= 0)
NOT_SELECTABLE = -1.0


def clip_boxes(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Clips xyxy boxes f32[..., 4] to [0, w] x [0, h] of their image, with sizes f32[..., 2] as (h, w)
    broadcastable to the boxes' leading dimensions (each image's own size, not the padded canvas)."""
    max_xyxy = image_sizes[..., [1, 0, 1, 0]]  # (..., 2) -> (..., 4) as (w, h, w, h)
    return torch.minimum(boxes.clamp(min=0), max_xyxy)


def nms_mask(boxes: Tensor, scores: Tensor, groups: Tensor, selectable: Tensor, iou_threshold: float) -> Tensor:
    """NMS inside every group, over a fixed candidate grid.

    Args:
        boxes: f32[B, N, 4]; scores: f32[B, N].
        groups: i64[B, N] NMS group of every candidate, distinct across images (e.g. image * L + level).
        selectable: bool[B, N], candidates that passed the score / size filters and enter the NMS.
        iou_threshold: candidates overlapping a better one of their group by more than this are suppressed.
    Returns:
        bool[B, N]: the selectable candidates that the NMS kept.
    """
    rows = torch.nonzero(selectable.flatten()).squeeze(1)  # (B*N,) -> (S,)
    # (B, N, 4) -> (S, 4); (B, N) -> (S,) twice
    candidates = boxes.flatten(0, 1)[rows], scores.flatten()[rows], groups.flatten()[rows]
    end = selectable.numel()
    if torch.compiler.is_exporting():
        # the maximum over all candidates, not the selected ones, is defined when S = 0
        kept_rows = _exportable_kept_rows(*candidates, rows, boxes.max() + 1, end, iou_threshold)
    else:
        # eagerly, torchvision's own: one NMS of groups moved apart up to 4000 candidates, one NMS per group above
        # (one NMS of all groups costs S^2 where few are suppressed: 1000 proposals x 90 classes at score 0, 15-18 s)
        kept_rows = rows[batched_nms(*candidates, iou_threshold)]
    # two rows past the grid, where the exported NMS marks its two extra boxes, cut off again; a scalar fill: a
    # value tensor of the kept count would be checked against the index's size when exported
    keep = torch.zeros(end + 2, dtype=torch.bool, device=selectable.device).index_fill(0, kept_rows, True)
    return keep[:end].view_as(selectable)


def _exportable_kept_rows(boxes: Tensor, scores: Tensor, groups: Tensor, rows: Tensor, coordinate_bound: Tensor,
                          end: int, iou_threshold: float) -> Tensor:
    """The NMS of `nms_mask` as one NMS, the form an exported graph holds (no loop over a data-dependent group
    count): boxes f32[S, 4] (>= 0), scores f32[S], groups i64[S] of the candidates at flat grid indices rows i64[S]
    -> i64[S' + 2], the kept candidates' grid indices and two indices past the grid's `end`."""
    # groups moved apart by more than the largest coordinate: one nms is then a per-group nms (torchvision's
    # coordinate trick)
    shifted = boxes + (groups.to(boxes.dtype) * coordinate_bound)[:, None]  # (S, 4)
    # two boxes at negative coordinates, apart from every other and scored below them, which NMS always keeps:
    # torchvision's registration of nms for torch.export declares at least 2 kept boxes, and an exported graph
    # asserts it (a level or an image keeping a single box would fail)
    extra = torch.tensor([[-4.0, -4.0, -3.0, -3.0], [-2.0, -2.0, -1.0, -1.0]], dtype=boxes.dtype, device=boxes.device)
    kept = nms(torch.cat([shifted, extra]), torch.cat([scores, scores.new_tensor([-1.0, -2.0])]),
               iou_threshold)  # (S' + 2,) indices into rows, then the two extra rows
    return torch.cat([rows, torch.arange(end, end + 2, device=rows.device)])[kept]


def top_per_image(boxes: Tensor, scores: Tensor, keep: Tensor, count: int,
                  values: tuple[Tensor, ...] = ()) -> tuple[Tensor, ...]:
    """The `count` best kept candidates of every image, by decreasing score, gathered into padded outputs.

    Args:
        boxes: f32[B, N, 4]; scores: f32[B, N] (>= 0); keep: bool[B, N], e.g. from `nms_mask`.
        count: P, rows per image in the result (static: the outputs' shapes do not depend on the data).
        values: further tensors [B, N] carried along (e.g. labels).
    Returns:
        valid bool[B, P] (a prefix of every row), boxes f32[B, P, 4], scores f32[B, P], then one [B, P] per
        `values`; sorted by score inside each image, zero where not valid.
    """
    masked = torch.where(keep, scores, NOT_SELECTABLE)
    # P unselectable columns make the row at least P long whatever N is: topk's k stays static
    masked = torch.cat([masked, masked.new_full((masked.shape[0], count), NOT_SELECTABLE)], dim=1)
    top_scores, index = masked.topk(count, dim=1)  # (B, P), sorted
    valid = top_scores > NOT_SELECTABLE
    index = torch.where(valid, index, 0)  # padding rows read column 0, then zeroed
    top_boxes = torch.gather(boxes, 1, index[:, :, None].expand(-1, -1, 4)) * valid[:, :, None]  # (B, P, 4)
    gathered = tuple(torch.gather(value, 1, index) * valid for value in (scores, *values))  # (B, P) each
    return (valid, top_boxes, *gathered)

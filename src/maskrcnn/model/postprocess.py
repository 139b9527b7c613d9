"""Batched paste of M x M box-relative mask probabilities into full images.

Each mask is resampled INSIDE its box (never stretched over the image, the original project's bug) for all
detections at once. Bilinear sampling of an axis-aligned box is separable: the value at image pixel (y, x) is
sum_ij wy[y, i] * mask[i, j] * wx[x, j], where wy / wx hold at most two non-zero interpolation weights per
row. So the paste of every detection is two batched matrix products, `Wy @ mask @ Wx^T`, instead of a
`grid_sample` over every pixel of every image: the same numbers as Detectron2's `grid_sample(align_corners=
False)` paste (zero padding outside the mask; tested to 1e-5), 4x faster (measured on one CPU thread, 100 masks
into 800x1088: 0.20 s against 0.81 s for a chunked grid_sample, 0.27 s for torchvision's per-instance paste,
most of ours being the first write of the 350 MB output), and with no intermediate larger than O(D (H + W) M):
the output itself is the only D x H x W tensor. Detections are still pasted in chunks, so that those
intermediates stay under `chunk_bytes` (64 MB by default) however large the photo and however many detections:
each image gets an output of its own size, written chunk by chunk.

Two modes:
- "exact" (default): pixel centre (x + 0.5) maps to mask coordinate ((x + 0.5 - x1) / (x2 - x1)) * M - 0.5,
  i.e. the box edges are sub-pixel and the mask covers exactly the box; nothing is rounded.
- "torchvision": reproduces `torchvision.models.detection.roi_heads.paste_masks_in_image`: the mask is padded
  by one zero pixel per side, the box expanded by (M + 2) / M, truncated to integers, and the padded mask
  resized (bilinear, align_corners=False, edge-clamped) into the inclusive integer box. Used to reproduce
  torchvision's outputs from converted weights; it shifts masks by up to a pixel, hence not the default.

Also here: `detections_per_image`, which turns the padded detections of `MaskRCNN.detect` into torchvision's
list of per-image dicts, masks pasted.

Shape letters: B images, D detections (of one image, or of the whole batch where said), M mask size,
H/W image size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from maskrcnn.model.box_head import Detections

PASTE_MODES = ("exact", "torchvision")
# memory for the interpolation weights and products of one chunk of pasted masks (not counting the output)
PASTE_CHUNK_BYTES = 64 * 2**20


def _exact_weights(starts: Tensor, ends: Tensor, length: int, mask_size: int) -> Tensor:
    """Interpolation weights f32[D, length, M] of image pixels 0..length-1 along one axis, box [starts, ends)."""
    return _exact_weights_at(starts, ends, torch.arange(length, device=starts.device)[None, :], mask_size)


def _exact_weights_at(starts: Tensor, ends: Tensor, pixels: Tensor, mask_size: int) -> Tensor:
    """`_exact_weights` of the pixels i64[D or 1, L] (indices along the axis): f32[D, L, M]."""
    centres = pixels.to(starts.dtype) + 0.5  # (D, L) pixel centres
    extent = (ends - starts).clamp(min=1e-6)  # degenerate boxes paste nothing instead of dividing by 0
    coords = (centres - starts[:, None]) / extent[:, None] * mask_size - 0.5  # (D, L) mask coordinates
    return _linear_taps(coords, mask_size, mask_size, offset=0, clamp=False)


def _torchvision_box(starts: Tensor, ends: Tensor, mask_size: int) -> tuple[Tensor, Tensor]:
    """torchvision's padded, expanded box along one axis: its first and last pixel (inclusive), i32[D] each."""
    half = (ends - starts) * 0.5 * ((mask_size + 2) / mask_size)
    centre = (ends + starts) * 0.5
    # truncation toward zero, as torchvision's boxes.to(int32)
    return (centre - half).to(torch.int32), (centre + half).to(torch.int32)


def _torchvision_weights(starts: Tensor, ends: Tensor, length: int, mask_size: int) -> Tensor:
    """Same as `_exact_weights` with torchvision's padded, expanded, integer-rounded box."""
    return _torchvision_weights_at(starts, ends, torch.arange(length, device=starts.device)[None, :], mask_size)


def _torchvision_weights_at(starts: Tensor, ends: Tensor, pixels: Tensor, mask_size: int) -> Tensor:
    """`_torchvision_weights` of the pixels i64[D or 1, L] (indices along the axis): f32[D, L, M]."""
    padded = mask_size + 2
    first, last = _torchvision_box(starts, ends, mask_size)
    size = (last - first + 1).clamp(min=1).to(starts.dtype)  # (D,) resized mask length
    local = pixels - first[:, None]  # (D, L) position inside the resized mask
    inside = (local >= 0) & (pixels <= last[:, None])
    # interpolate(align_corners=False): source = (dst + 0.5) * in / out - 0.5, negative clamped to 0; the
    # scale in float32 and the product in float64, as PyTorch's CPU kernel (bit-equal weights)
    # (a tensor divided into a Python number is reciprocal-then-multiply, one ulp off: divide two tensors)
    scale = (torch.full_like(size, padded) / size).double()  # (D,)
    coords = ((local.double() + 0.5) * scale[:, None] - 0.5).to(starts.dtype).clamp(min=0)
    weights = _linear_taps(coords, padded, mask_size, offset=1, clamp=True)  # (D, L, M)
    return weights * inside[..., None]


def paste_weights(starts: Tensor, ends: Tensor, pixels: Tensor, mask_size: int, mode: str = "exact") -> Tensor:
    """The interpolation weights f32[D, L, M] that `paste_masks` gives the pixels i64[D or 1, L] (indices along
    one axis, e.g. a window of the image per detection) for boxes [starts, ends) f32[D] along that axis: the
    same numbers, bit for bit, as the rows of those pixels in the paste over the whole image."""
    weights = _exact_weights_at if mode == "exact" else _torchvision_weights_at
    return weights(starts.float(), ends.float(), pixels, mask_size)


def paste_support(starts: Tensor, ends: Tensor, length: int, mask_size: int, mode: str = "exact"
                  ) -> tuple[Tensor, Tensor]:
    """The pixels along one axis (0..length-1) that the paste of boxes [starts, ends) f32[D] can make non-zero:
    [first, stop) i64[D] each, a superset of them (possibly empty: first == stop), inside the image.

    "exact": the bilinear taps of pixel x are non-zero for mask coordinates -1 < u < M, i.e. for pixel centres
    less than half a mask cell (extent / 2M) beyond the box, extent = max(end - start, 1e-6) as in the weights;
    one pixel more each side absorbs the rounding of the computed coordinates. "torchvision": the inclusive
    integer box the padded mask is resized into.
    """
    starts, ends = starts.float(), ends.float()
    if mode == "exact":
        extent = (ends - starts).clamp(min=1e-6)
        reach = extent / (2 * mask_size) + 0.5  # half a mask cell, and the pixel centre's half pixel
        first = torch.floor(starts - reach).to(torch.int64) - 1
        stop = torch.ceil(starts + extent + reach).to(torch.int64) + 1
    else:
        first_in_box, last_in_box = _torchvision_box(starts, ends, mask_size)
        first, stop = first_in_box.to(torch.int64), last_in_box.to(torch.int64) + 1
    first = first.clamp(0, length)
    return first, stop.clamp(min=0, max=length).maximum(first)


def _linear_taps(coords: Tensor, source_len: int, mask_size: int, *, offset: int, clamp: bool) -> Tensor:
    """Bilinear weights f32[D, L, M] of source coordinates `coords` f32[D, L].

    The source has `source_len` samples; source sample s is mask index s - offset (offset 1: a zero border of
    one sample, contributing nothing). clamp=True repeats the last source sample beyond the end (interpolate),
    clamp=False treats everything outside the source as zero (grid_sample's zero padding).
    """
    low = torch.floor(coords)
    frac = coords - low
    low = low.to(torch.int64)
    high = low + 1
    if clamp:
        high = high.clamp(max=source_len - 1)
    weights = coords.new_zeros((*coords.shape, mask_size))
    for index, weight in ((low, 1.0 - frac), (high, frac)):
        index = index - offset
        usable = (index >= 0) & (index < mask_size)
        # scatter_add: low and high coincide when clamped at the end, their weights then add up as in interpolate
        weights.scatter_add_(2, index.clamp(0, mask_size - 1)[..., None], (weight * usable)[..., None])
    return weights


def paste_masks(masks: Tensor, boxes: Tensor, counts: Sequence[int], image_sizes: Sequence[tuple[int, int]],
                mode: str = "exact", chunk_bytes: int = PASTE_CHUNK_BYTES) -> list[Tensor]:
    """Pastes every mask inside its box in its image.

    Args:
        masks: f32[D, M, M] (or [D, 1, M, M]) probabilities relative to each box, D over the whole batch.
        boxes: f32[D, 4] xyxy in the pixels of the image each mask is pasted into.
        counts: B numbers of detections per image; the detections are grouped by image, in image order.
        image_sizes: B (h, w) of the output images.
        mode: "exact" or "torchvision" (see the module docstring).
        chunk_bytes: bound on the memory of one chunk's intermediates (weights and products, about
            4 bytes * 4 * (h + w) * M per mask); beyond it the masks of an image are pasted in several chunks.
            The outputs themselves (4 bytes * D * h * w) come on top.
    Returns:
        B tensors f32[D_i, 1, h_i, w_i] of probabilities (zero outside each box).
    """
    if mode not in PASTE_MODES:
        raise ValueError(f"paste_masks: mode must be one of {PASTE_MODES}, got {mode!r}")
    masks = masks.reshape(masks.shape[0], masks.shape[-2], masks.shape[-1]).float()  # (D, M, M)
    boxes = boxes.float()
    mask_size = masks.shape[-1]
    weights = _exact_weights if mode == "exact" else _torchvision_weights
    pasted_per_image = []
    for masks_i, boxes_i, (height, width) in zip(masks.split(list(counts)), boxes.split(list(counts)), image_sizes):
        pasted = masks.new_empty((masks_i.shape[0], 1, height, width))  # (D_i, 1, h, w)
        # wy, wx, their index and fraction temporaries and the product (M, w): about 4 (h + w) M floats per mask
        chunk = max(1, chunk_bytes // (4 * 4 * (height + width) * mask_size))
        for start in range(0, masks_i.shape[0], chunk):
            stop = start + chunk
            wy = weights(boxes_i[start:stop, 1], boxes_i[start:stop, 3], height, mask_size)  # (c, h, M)
            wx = weights(boxes_i[start:stop, 0], boxes_i[start:stop, 2], width, mask_size)  # (c, w, M)
            # float32 also under bf16 autocast: bf16's 8-bit mantissa would move pixels near 0.5 across the threshold
            with torch.autocast(masks.device.type, enabled=False):
                # (c, h, M) @ ((c, M, M) @ (c, M, w)) -> (c, h, w), written into the output in place
                torch.bmm(wy, torch.bmm(masks_i[start:stop], wx.transpose(1, 2)), out=pasted[start:stop, 0])
        pasted_per_image.append(pasted)
    return pasted_per_image


def detections_per_image(detections: Detections, original_sizes: Sequence[tuple[int, int]],
                         paste_mode: str = "exact") -> list[dict[str, Tensor]]:
    """Padded detections of a batch -> one dict per image, masks pasted into the image.

    Args:
        detections: from `MaskRCNN.detect`: boxes f32[B, D, 4] in original-image pixels, masks f32[B, D, M, M].
        original_sizes: B (h, w) of the images the detections belong to.
        paste_mode: see `paste_masks`.
    Returns:
        B dicts {"boxes" f32[D_i, 4], "labels" i64[D_i], "scores" f32[D_i], "masks" f32[D_i, 1, h, w]}.
    """
    counts = detections.valid.sum(dim=1).tolist()  # the host sync of this stage: the output sizes
    boxes, scores, labels, masks = (unpad(t, counts) for t in
                                    (detections.boxes, detections.scores, detections.labels, detections.masks))
    masks_per_image = paste_masks(torch.cat(masks), torch.cat(boxes), counts, original_sizes, mode=paste_mode)
    return [{"boxes": b, "labels": la, "scores": s, "masks": m}
            for b, la, s, m in zip(boxes, labels, scores, masks_per_image)]


def unpad(padded: Tensor, counts: Sequence[int]) -> list[Tensor]:
    """[B, P, *rest] whose valid rows are a prefix of every row -> B tensors [counts_i, *rest] (views)."""
    return [rows[:count] for rows, count in zip(padded, counts)]

"""What the export tests share: generated images (always there) and Penn-Fudan photos (skipped without them), in
batches of one size, and the comparison of exported detections with the eager model's."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from maskrcnn.export import OUTPUT_NAMES
from maskrcnn.model import MaskRCNN

IMAGE_SIZE = (240, 320)  # (H, W): one size per batch; Penn-Fudan photos are resized to it


def generated_images() -> list[torch.Tensor]:
    """3 generated images f32[3, 240, 320] of smooth 20-pixel blobs: stand-ins for photos that need no data."""
    generator = torch.Generator().manual_seed(0)
    blobs = torch.rand(3, 3, IMAGE_SIZE[0] // 20, IMAGE_SIZE[1] // 20, generator=generator)
    return list(blobs.repeat_interleave(20, 2).repeat_interleave(20, 3))


def penn_fudan_photos(count: int = 3) -> list[torch.Tensor]:
    """The first `count` Penn-Fudan street photos resized to f32[3, 240, 320]; skips the test without them
    (tests/conftest.py sets MASKRCNN_PENNFUDAN when ../shared/data/PennFudanPed exists)."""
    root = os.environ.get("MASKRCNN_PENNFUDAN")
    files = sorted((Path(root) / "PNGImages").glob("*.png"))[:count] if root else []
    if not files:
        pytest.skip("no Penn-Fudan photos: set MASKRCNN_PENNFUDAN to the PennFudanPed folder")
    images = []
    for file in files:
        image = torch.from_numpy(np.array(Image.open(file).convert("RGB"))).permute(2, 0, 1).float() / 255
        images.append(torch.nn.functional.interpolate(image[None], size=IMAGE_SIZE, mode="bilinear")[0])
    return images


def batches(images: list[torch.Tensor], odd_size: tuple[int, int] = (200, 307)) -> dict[str, list[torch.Tensor]]:
    """Batches of 3 `images` f32[3, 240, 320]: the first alone, all 3, the blank image alone and among them, and
    2 of `odd_size`: a size whose resized size floor(side * scale) differs between float64 (eager) and float32."""
    blank = torch.zeros(3, *IMAGE_SIZE)
    odd = [torch.nn.functional.interpolate(image[None], size=odd_size, mode="bilinear")[0] for image in images[1:]]
    return {"one": images[:1], "blank": [blank], "three": images, "two_and_blank": [images[0], blank, images[2]],
            "odd": odd}


def pair_detections(expected: dict, actual: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """For each expected detection, the actual one of the same label with the highest box IoU: (IoU f32[D_e],
    index i64[D_e] into actual's rows)."""
    same_label = expected["labels"][:, None] == actual["labels"][None, :]
    return (box_iou(expected["boxes"], actual["boxes"]) * same_label).max(dim=1)


def mask_ious(expected: dict, actual: dict, pair: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU f32[D_e] of the pasted masks binarised at 0.5, expected row i against actual row pair[i], and the size
    of their union i64[D_e] (0 where both are empty)."""
    masks_e, masks_a = expected["masks"][:, 0] >= 0.5, actual["masks"][pair, 0] >= 0.5  # (D_e, H, W) each
    union = (masks_e | masks_a).flatten(1).sum(1)
    return (masks_e & masks_a).flatten(1).sum(1) / union.clamp(min=1), union


def assert_same_detections(expected: list[dict], actual: list[dict]) -> None:
    """Same number of detections per image and, for each expected one, an actual one of the same label with box
    IoU >= 0.99, |score difference| <= 1e-3 and mask IoU >= 0.98 (masks pasted, binarised at 0.5).

    Detections are paired by label and box IoU rather than by row: rows whose scores differ only by float rounding
    may swap places in the score order.
    """
    assert len(actual) == len(expected)
    for index, (e, a) in enumerate(zip(expected, actual)):
        assert a["boxes"].shape[0] == e["boxes"].shape[0], f"image {index}: number of detections"
        if e["boxes"].shape[0] == 0:
            continue
        iou, pair = pair_detections(e, a)  # (D,) each
        assert pair.unique().numel() == pair.numel(), f"image {index}: two detections paired with one"
        assert iou.min() >= 0.99, f"image {index}: box IoU {iou.min():.4f}"
        assert (e["scores"] - a["scores"][pair]).abs().max() <= 1e-3, f"image {index}: scores"
        mask_iou, union = mask_ious(e, a, pair)
        assert mask_iou[union > 0].min() >= 0.98, f"image {index}: mask IoU {mask_iou[union > 0].min():.4f}"


def assert_most_detections_kept(expected: list[dict], actual: list[dict], count: int, min_kept: int, *,
                                score_diff: float, min_mask_iou: float, where: str) -> None:
    """For a lower-precision run (int8, bf16) of a graph: every image has `count` detections in both, and at least
    `min_kept` expected ones have an actual one of the same label with box IoU >= 0.9, |score difference| <=
    `score_diff` and mask IoU >= `min_mask_iou`."""
    for index, (e, a) in enumerate(zip(expected, actual, strict=True)):
        assert a["boxes"].shape[0] == e["boxes"].shape[0] == count, f"{where}, image {index}: number of detections"
        iou, pair = pair_detections(e, a)  # (count,) each
        kept = iou >= 0.9
        assert kept.sum() >= min_kept, f"{where}, image {index}: {int(kept.sum())} of {count} detections kept"
        assert (e["scores"][kept] - a["scores"][pair[kept]]).abs().max() <= score_diff, f"{where}, image {index}"
        mask_iou = mask_ious(e, a, pair)[0][kept]
        assert mask_iou.min() >= min_mask_iou, f"{where}, image {index}: mask IoU {mask_iou.min():.3f}"


def assert_contract(predictor, images: list[torch.Tensor], detections_per_img: int, mask_size: int,
                    num_classes: int) -> None:
    """The graph's raw outputs: names, dtypes, shapes [B, D, ...], labels 1..K, zeros past num_detections."""
    outputs = predictor.run(torch.stack(images))
    B, D, M = len(images), detections_per_img, mask_size
    shapes = {"boxes": (B, D, 4), "scores": (B, D), "labels": (B, D), "masks": (B, D, M, M), "num_detections": (B,)}
    dtypes = {"boxes": torch.float32, "scores": torch.float32, "labels": torch.int64, "masks": torch.float32,
              "num_detections": torch.int64}
    assert tuple(outputs) == OUTPUT_NAMES
    for name in OUTPUT_NAMES:
        assert tuple(outputs[name].shape) == shapes[name] and outputs[name].dtype == dtypes[name], name
    filled = torch.arange(D)[None, :] < outputs["num_detections"][:, None]  # (B, D)
    for name in ("boxes", "scores", "labels", "masks"):
        assert not outputs[name][~filled].any(), f"{name}: rows past num_detections are not zero"
    labels = outputs["labels"][filled]
    assert ((labels >= 1) & (labels <= num_classes)).all()
    scores, masks = outputs["scores"][filled], outputs["masks"]
    assert ((scores >= 0) & (scores <= 1)).all() and ((masks >= 0) & (masks <= 1)).all()


def spread_scores(model: MaskRCNN, seed: int, class_std: float) -> MaskRCNN:
    """Random-init RPN and class weights whose scores spread apart (at their default init the scores are all about
    1/2 and 1/(K+1): the order of near-ties would test float rounding, not the graph; too spread, sigmoid and
    softmax saturate at exactly 1.0, ties again). `class_std` depends on the scale of the box head's features."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model.rpn.head.cls_logits.weight.normal_(std=0.1)
        model.box_head.cls_score.weight.normal_(std=class_std)
    return model.eval()


def pooled_feature_maps(path: Path, images: list[torch.Tensor]) -> list[np.ndarray]:
    """The feature maps that the RoiAlign nodes of the ONNX model `path` pool (the FPN's outputs, f32[B, C, h, w]
    per level, in the graph's order), computed by ONNX Runtime on one batch of `images` of one size: what int8
    quantisation of the backbone and FPN changes, before the proposals' order does."""
    import onnx
    import onnxruntime

    model = onnx.load(str(path))
    names = list(dict.fromkeys(node.input[0] for node in model.graph.node if node.op_type == "RoiAlign"))
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(names, {"images": torch.stack(images).numpy()})


def relative_error(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """||actual - expected|| / ||expected|| over all the arrays together (L2, as one vector)."""
    squared = sum(float(np.square(a - e).sum()) for e, a in zip(expected, actual, strict=True))
    return (squared / sum(float(np.square(e).sum()) for e in expected)) ** 0.5

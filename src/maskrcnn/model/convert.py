"""Conversion between torchvision's `maskrcnn_resnet50_fpn` (v1) and this package's `MaskRCNN`.

The backbone and RPN use torchvision's layer names, so only the RoI heads are renamed:

    roi_heads.box_head.fc6/fc7                    <-> box_head.fc6/fc7
    roi_heads.box_predictor.cls_score/bbox_pred   <-> box_head.cls_score/bbox_pred
    roi_heads.mask_head.<i>.0 (or mask_fcn<i+1>)   <-> mask_head.convs.<i>
    roi_heads.mask_predictor.conv5_mask           <-> mask_head.deconv
    roi_heads.mask_predictor.mask_fcn_logits      <-> mask_head.logits

Legacy torchvision key layouts (before torchvision 0.13: `fpn.inner_blocks.<i>.weight`, `rpn.head.conv.weight`,
`mask_head.mask_fcn<n>`) are accepted too. With `torchvision_compatible_config` (RoIAlign aligned=False,
torchvision's integer mask paste, its sizes and thresholds) the converted model gives torchvision's detections.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from maskrcnn.config import BoxHeadConfig, ModelConfig, RPNConfig, TransformConfig
from maskrcnn.model.maskrcnn import MaskRCNN, build_model

logger = logging.getLogger(__name__)

# (torchvision pattern, ours); applied in order, first match wins
_TO_OURS = [
    (r"^roi_heads\.box_head\.", "box_head."),
    (r"^roi_heads\.box_predictor\.", "box_head."),
    (r"^roi_heads\.mask_head\.(\d+)\.0\.", lambda m: f"mask_head.convs.{m.group(1)}."),
    (r"^roi_heads\.mask_head\.mask_fcn(\d+)\.", lambda m: f"mask_head.convs.{int(m.group(1)) - 1}."),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.", "mask_head.deconv."),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "mask_head.logits."),
    (r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1"),
    (r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.(weight|bias)$", r"backbone.fpn.\1_blocks.\2.0.\3"),
]
_TO_TORCHVISION = [
    (r"^box_head\.(fc6|fc7)\.", r"roi_heads.box_head.\1."),
    (r"^box_head\.(cls_score|bbox_pred)\.", r"roi_heads.box_predictor.\1."),
    (r"^mask_head\.convs\.(\d+)\.", r"roi_heads.mask_head.\1.0."),
    (r"^mask_head\.deconv\.", "roi_heads.mask_predictor.conv5_mask."),
    (r"^mask_head\.logits\.", "roi_heads.mask_predictor.mask_fcn_logits."),
]
# layers whose shape depends on the number of classes (skipped when fine-tuning to another class count)
CLASS_DEPENDENT_PREFIXES = ("box_head.cls_score.", "box_head.bbox_pred.", "mask_head.logits.")


def _rename(state: dict[str, Tensor], rules: list) -> dict[str, Tensor]:
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            new_key, hits = re.subn(pattern, replacement, key)
            if hits:
                key = new_key
                break
        renamed[key] = value
    return renamed


def from_torchvision_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision `maskrcnn_resnet50_fpn` state dict with this package's key names."""
    return _rename(state, _TO_OURS)


def to_torchvision_state_dict(model: MaskRCNN) -> dict[str, Tensor]:
    """Our model's state dict with torchvision's key names (loadable by `maskrcnn_resnet50_fpn` of the same
    number of classes and backbone)."""
    return _rename(model.state_dict(), _TO_TORCHVISION)


def torchvision_compatible_config(num_classes: int) -> ModelConfig:
    """The settings under which a converted torchvision v1 model reproduces torchvision's detections:
    ResNet-50, RoIAlign aligned=False, torchvision's mask paste, min 800 / max 1333 and its thresholds."""
    return ModelConfig(num_classes=num_classes, roi_align_aligned=False, paste_mode="torchvision",
                       transform=TransformConfig(min_size=800, max_size=1333, size_divisible=32),
                       rpn=RPNConfig(), box_head=BoxHeadConfig())


def _settings_of(model: nn.Module, cfg: ModelConfig) -> ModelConfig:
    """`cfg` with the sizes and thresholds a torchvision `MaskRCNN` module was configured with."""
    transform, rpn, heads = model.transform, model.rpn, model.roi_heads
    return dataclasses.replace(
        cfg,
        transform=dataclasses.replace(cfg.transform, min_size=int(transform.min_size[-1]),
                                      max_size=int(transform.max_size), size_divisible=int(transform.size_divisible),
                                      image_mean=tuple(transform.image_mean), image_std=tuple(transform.image_std)),
        rpn=dataclasses.replace(cfg.rpn, pre_nms_top_n_train=rpn._pre_nms_top_n["training"],
                                pre_nms_top_n_test=rpn._pre_nms_top_n["testing"],
                                post_nms_top_n_train=rpn._post_nms_top_n["training"],
                                post_nms_top_n_test=rpn._post_nms_top_n["testing"], nms_thresh=rpn.nms_thresh,
                                min_size=rpn.min_size, score_thresh=rpn.score_thresh),
        box_head=dataclasses.replace(cfg.box_head, score_thresh=heads.score_thresh, nms_thresh=heads.nms_thresh,
                                     detections_per_img=heads.detections_per_img))


def from_torchvision(model_or_state_dict: nn.Module | dict[str, Tensor], **overrides) -> MaskRCNN:
    """Our `MaskRCNN` with the weights of a torchvision `maskrcnn_resnet50_fpn` (v1).

    Args:
        model_or_state_dict: the torchvision model (its transform sizes and RPN / RoI-head thresholds are
            copied too) or its state dict (torchvision's default settings are used).
        overrides: `ModelConfig` fields to replace, e.g. `transform=TransformConfig(min_size=320, ...)` or
            `paste_mode="exact"`. The speed options `channels_last` and `fuse_batchnorm` (on by default) only
            round differently; both False reproduces torchvision's float operations in the same order (bit-equal
            boxes and scores on CPU).
    Returns:
        MaskRCNN in eval mode; num_classes is inferred from the predictor's shape.
    """
    is_module = isinstance(model_or_state_dict, nn.Module)
    state = model_or_state_dict.state_dict() if is_module else model_or_state_dict
    if "roi_heads.box_predictor.cls_score.weight" not in state:
        raise ValueError("from_torchvision: not a torchvision Mask R-CNN state dict "
                         "(no roi_heads.box_predictor.cls_score.weight)")
    num_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1
    cfg = torchvision_compatible_config(num_classes)
    if is_module:
        cfg = _settings_of(model_or_state_dict, cfg)
    cfg = dataclasses.replace(cfg, **overrides)
    model = build_model(cfg)
    model.load_state_dict(from_torchvision_state_dict(state))
    return model.eval()


def load_torchvision_coco(model: MaskRCNN) -> None:
    """Loads torchvision's `MaskRCNN_ResNet50_FPN_Weights.COCO_V1` into `model` (downloaded once into the torch
    hub cache). When the model has another number of classes than COCO's 90, the class-dependent predictor
    layers keep their fresh initialisation (fine-tuning)."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    weights = MaskRCNN_ResNet50_FPN_Weights.COCO_V1
    try:
        state = weights.get_state_dict(progress=False)
    except OSError as error:  # URLError is an OSError
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise RuntimeError(f"model.weights=torchvision-coco: cannot download {weights.url} ({error}); "
                           f"put the file at {cache} or give a checkpoint path") from None
    state = from_torchvision_state_dict(state)
    num_classes = state["box_head.cls_score.weight"].shape[0] - 1
    skipped = []
    if num_classes != model.box_head.num_classes:
        skipped = [key for key in state if key.startswith(CLASS_DEPENDENT_PREFIXES)]
        for key in skipped:
            del state[key]
        logger.info("torchvision-coco weights have %d classes, the model %d: predictor layers %s stay freshly "
                    "initialised", num_classes, model.box_head.num_classes, ", ".join(CLASS_DEPENDENT_PREFIXES))
    needs = "model.weights=torchvision-coco needs model.backbone.depth=50 and fpn_channels=256"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise RuntimeError(f"{needs}: {str(error)[:500]}") from None
    missing = [key for key in missing if not (skipped and key.startswith(CLASS_DEPENDENT_PREFIXES))]
    if missing or unexpected:
        raise RuntimeError(f"{needs}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")

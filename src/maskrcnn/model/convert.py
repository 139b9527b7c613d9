"""Conversion between torchvision's `maskrcnn_resnet50_fpn` (v1) and this package's `MaskRCNN`.

The backbone and RPN use torchvision's layer names, so only the RoI heads are renamed:

    roi_heads.box_head.fc6/fc7                    <-> box_head.fc6/fc7
    roi_heads.box_predictor.cls_score/bbox_pred   <-> box_head.cls_score/bbox_pred
    roi_heads.mask_head.<i>.0 (or mask_fcn<i+1>)   <-> mask_head.convs.<i>
    roi_heads.mask_predictor.conv5_mask           <-> mask_head.deconv
    roi_heads.mask_predictor.mask_fcn_logits      <-> mask_head.logits

Legacy torchvision key layouts (before torchvision 0.13: `fpn.inner_blocks.<i>.weight`, `rpn.head.conv.weight`,
`mask_head.mask_fcn<n>`) are accepted too. Building a model from torchvision's weights: `build.from_torchvision`;
the settings that reproduce torchvision's detections: `pretrained.torchvision_compatible_config`.
"""

from __future__ import annotations

import re

from torch import Tensor

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


def to_torchvision_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our model's state dict with torchvision's key names (loadable by `maskrcnn_resnet50_fpn` of the same
    number of classes and backbone)."""
    return _rename(state, _TO_TORCHVISION)

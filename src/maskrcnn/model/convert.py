"""Conversion between torchvision's `maskrcnn_resnet50_fpn` (v1) or `maskrcnn_resnet50_fpn_v2` and this package's
`MaskRCNN`.

The backbone (its FPN with or without BatchNorm) and the RPN (1 or 2 convs) use torchvision's layer names, so only
the RoI heads are renamed:

    roi_heads.box_head.fc6/fc7                    <-> box_head.fc6/fc7                 (v1: TwoMLPHead)
    roi_heads.box_head.<i>.0 / <i>.1               <-> box_head.convs.<i> / norms.<i>  (v2: FastRCNNConvFCHead)
    roi_heads.box_head.<j> (its Linear layers)     <-> box_head.fc6, fc7 in their order
    roi_heads.box_predictor.cls_score/bbox_pred   <-> box_head.cls_score/bbox_pred
    roi_heads.mask_head.<i>.0 (or mask_fcn<i+1>)   <-> mask_head.convs.<i>
    roi_heads.mask_head.<i>.1 (v2's BatchNorm)     <-> mask_head.norms.<i>
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
    (r"^roi_heads\.box_head\.(\d+)\.0\.", r"box_head.convs.\1."),
    (r"^roi_heads\.box_head\.(\d+)\.1\.", r"box_head.norms.\1."),
    (r"^roi_heads\.box_head\.", "box_head."),
    (r"^roi_heads\.box_predictor\.", "box_head."),
    (r"^roi_heads\.mask_head\.(\d+)\.0\.", lambda m: f"mask_head.convs.{m.group(1)}."),
    (r"^roi_heads\.mask_head\.(\d+)\.1\.", lambda m: f"mask_head.norms.{m.group(1)}."),
    (r"^roi_heads\.mask_head\.mask_fcn(\d+)\.", lambda m: f"mask_head.convs.{int(m.group(1)) - 1}."),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.", "mask_head.deconv."),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "mask_head.logits."),
    (r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1"),
    (r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.(weight|bias)$", r"backbone.fpn.\1_blocks.\2.0.\3"),
]
_TO_TORCHVISION = [
    (r"^box_head\.convs\.(\d+)\.", r"roi_heads.box_head.\1.0."),
    (r"^box_head\.norms\.(\d+)\.", r"roi_heads.box_head.\1.1."),
    (r"^box_head\.(cls_score|bbox_pred)\.", r"roi_heads.box_predictor.\1."),
    (r"^mask_head\.convs\.(\d+)\.", r"roi_heads.mask_head.\1.0."),
    (r"^mask_head\.norms\.(\d+)\.", r"roi_heads.mask_head.\1.1."),
    (r"^mask_head\.deconv\.", "roi_heads.mask_predictor.conv5_mask."),
    (r"^mask_head\.logits\.", "roi_heads.mask_predictor.mask_fcn_logits."),
]
# the Linear layers of torchvision's sequential box head (v2), e.g. roi_heads.box_head.5.weight
_SEQUENTIAL_FC = r"^roi_heads\.box_head\.(\d+)\.(weight|bias)$"
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


def _indices(state: dict[str, Tensor], pattern: str) -> list[int]:
    """The distinct numbers that group 1 of `pattern` matches in the keys of `state`, ascending."""
    return sorted({int(match.group(1)) for key in state if (match := re.match(pattern, key))})


def from_torchvision_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision `maskrcnn_resnet50_fpn` or `maskrcnn_resnet50_fpn_v2` state dict with this package's key
    names."""
    # v2's box head is one nn.Sequential (convs, Flatten, Linear, ReLU): its Linear layers are fc6, fc7 in order
    fc_names = {index: f"fc{6 + order}" for order, index in enumerate(_indices(state, _SEQUENTIAL_FC))}
    sequential_fc = (_SEQUENTIAL_FC, lambda m: f"box_head.{fc_names[int(m.group(1))]}.{m.group(2)}")
    return _rename(state, [sequential_fc, *_TO_OURS])


def to_torchvision_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our model's state dict with torchvision's key names: a box head with convs in v2's sequential layout
    (loadable by `maskrcnn_resnet50_fpn_v2`), one without in v1's (`maskrcnn_resnet50_fpn`), for the same number
    of classes and backbone."""
    num_convs = len(_indices(state, r"^box_head\.convs\.(\d+)\."))
    if num_convs:  # Sequential(conv blocks..., Flatten, Linear, ReLU, Linear, ReLU): fc6 at num_convs + 1
        fc_rule = (r"^box_head\.fc(\d+)\.",
                   lambda m: f"roi_heads.box_head.{num_convs + 1 + 2 * (int(m.group(1)) - 6)}.")
    else:
        fc_rule = (r"^box_head\.(fc6|fc7)\.", r"roi_heads.box_head.\1.")
    return _rename(state, [fc_rule, *_TO_TORCHVISION])

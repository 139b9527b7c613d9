"""The exported module: `MaskRCNN.detect` with tensors in and the export contract's tuple out.

Nothing of the model is re-implemented here: `detect` is exportable as written (see its docstring).

Shape letters: B images, D detections per image, M mask size.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from maskrcnn.model.maskrcnn import MaskRCNN
from maskrcnn.model.precision import PrecisionChoice

OUTPUT_NAMES = ("boxes", "scores", "labels", "masks", "num_detections")


class DetectAdapter(nn.Module):
    """`model.detect` as a module whose outputs are a tuple of tensors (what exporters take).

    Args:
        model: the model to export; a frozen copy in eval mode on the CPU is taken, so later changes to `model` do
            not reach the graph. The CPU speed layer (`cpu_speedups.optimize_for_cpu`) stays: its BatchNorm folding
            becomes arithmetic on the weights (which ONNX Runtime folds into constants when it loads the file),
            its other tricks apply only in eager mode. The graph runs in float32 (`model.precision` is not
            exported).

    forward(images f32[B, 3, H, W] RGB in 0..1) returns, D = detections_per_img, M = mask size:
        boxes f32[B, D, 4] xyxy in input pixels, scores f32[B, D], labels i64[B, D] (1..K),
        masks f32[B, D, M, M] box-relative mask probabilities of the detected class, num_detections i64[B];
        rows past num_detections are zero.
    """

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).cpu()
        # float32, whatever model.precision says: `auto` still timing would trace a bf16 call every other time
        self.model.precision = PrecisionChoice("fp32")
        self.requires_grad_(False).eval()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """f32[B, 3, H, W] in 0..1 -> (boxes, scores, labels, masks, num_detections), see the class docstring."""
        detections = self.model.detect(images)
        return (detections.boxes, detections.scores, detections.labels, detections.masks,
                detections.valid.sum(dim=1))

"""Static int8 quantisation of an exported ONNX model's backbone and FPN, for ONNX Runtime on the CPU.

The backbone and FPN are most of the graph's convolution time; in int8 (ONNX Runtime's QLinearConv, VNNI where the
CPU has it) they run several times faster at almost no accuracy cost (benchmarks/RESULTS.md, "Static int8"). The
RPN, box and mask heads, the NMS and RoiAlign stay fp32: they decide boxes, scores and masks directly, and the NMS
and RoiAlign have no int8 kernels. Activation ranges are calibrated by running the fp32 model on real images.

Shape letters: H/W image size.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

# The backbone and FPN operators made int8: Relu, Add, MaxPool and Resize with the convolutions, so that consecutive
# int8 convolutions hand uint8 tensors to each other instead of going back to fp32 in between.
QUANTIZED_OP_TYPES = ("Conv", "Relu", "Add", "MaxPool", "Resize")


def feature_nodes(model) -> list:
    """The nodes of an exported ONNX model (onnx.ModelProto) that compute the feature maps RoiAlign pools, i.e. the
    backbone and FPN: every ancestor of the RoiAlign nodes' feature input. The heads are not among them: the RPN
    head only feeds the proposals (RoiAlign's box input), the box and mask heads come after RoiAlign."""
    producer = {output: node for node in model.graph.node for output in node.output}
    pending = [node.input[0] for node in model.graph.node if node.op_type == "RoiAlign"]
    seen: set[str] = set()
    nodes = []
    while pending:
        tensor = pending.pop()
        if tensor in seen or tensor not in producer:  # graph inputs and initializers have no producer
            continue
        seen.add(tensor)
        nodes.append(producer[tensor])
        pending.extend(producer[tensor].input)
    return nodes


class _Calibration:
    """onnxruntime.quantization.CalibrationDataReader over images f32[3, H, W], one batch of one image each."""

    def __init__(self, images: Sequence[Tensor]) -> None:
        self.images = iter(images)

    def get_next(self) -> dict | None:
        image = next(self.images, None)
        return None if image is None else {"images": image[None].float().contiguous().numpy()}  # (3,H,W)->(1,3,H,W)


def quantize_backbone(path: str | Path, out: str | Path, calibration: Sequence[Tensor]) -> int:
    """Writes to `out` the ONNX model `path` (written by `export_model`) with its backbone and FPN in static int8:
    QDQ format, per-channel int8 weights, uint8 activations whose ranges are the min / max seen on `calibration`.
    The metadata (class names, paste mode) is kept, so `OnnxPredictor` runs `out` like `path`.

    Args:
        calibration: images f32[3, H, W] in 0..1 like the model's inputs (any sizes), e.g. a few dozen photos of
            the kind the model will see.
    Returns:
        the number of convolutions quantised.
    Raises:
        ValueError: no calibration images, or `path` has no RoiAlign (not a graph of `export_model`).
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise ValueError(f"{out}: static int8 quantisation needs at least one calibration image")
    with tempfile.TemporaryDirectory() as work:
        # constant folding first: the exported convolution weights can be products (a frozen batch norm's scale
        # folded in by a Mul node), and only initializers get int8 weights
        folded = Path(work) / "folded.onnx"
        quant_pre_process(str(path), str(folded), skip_symbolic_shape=True)
        nodes = feature_nodes(onnx.load(str(folded)))
        if not nodes:
            raise ValueError(f"{path}: no RoiAlign feature input found; not a model written by `maskrcnn export`")
        quantize_static(str(folded), str(out), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                        nodes_to_quantize=[node.name for node in nodes if node.op_type in QUANTIZED_OP_TYPES])
    return sum(node.op_type == "Conv" for node in nodes)

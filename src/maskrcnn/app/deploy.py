"""A trained model written for a runtime: ONNX (optionally with its backbone and FPN in static int8) or a
torch.export program, through `maskrcnn.export`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from maskrcnn.errors import UserError
from maskrcnn.export import ExportInfo, export_model
from maskrcnn.export.exporter import SUFFIXES


def check_export_targets(outs: Sequence[str | Path], *, int8: bool) -> None:
    """Before any work: each file name says its format, no file is named twice, and int8 is for ONNX only.

    Raises:
        UserError: another suffix, a name given twice, or int8 asked for a .pt2.
    """
    for out in map(Path, outs):
        if out.suffix not in SUFFIXES:
            raise UserError(f"--out {out}: the file name must end in .onnx (ONNX) or .pt2 (torch.export)")
        if int8 and out.suffix != ".onnx":
            raise UserError(f"--out {out}: --int8 quantises ONNX models for ONNX Runtime; the file name must end "
                            f"in .onnx")
    if len(set(map(Path, outs))) < len(outs):
        raise UserError(f"--out {' '.join(map(str, outs))}: a file is named twice")


def export_for_runtime(model: torch.nn.Module, outs: Sequence[str | Path], *, class_names: list[str] | None,
                       opset: int, calibration: list[torch.Tensor] | None = None) -> tuple[ExportInfo, int | None]:
    """Exports `model` (moved to the CPU) to each of `outs` from one trace; with `calibration` images (f32[3, H, W]
    in 0..1) each ONNX model's backbone and FPN become static int8, their activation ranges calibrated on them.

    Returns:
        (the ExportInfo stored with the graph, the number of int8 convolutions or None without `calibration`).
    Raises:
        UserError: the optional packages of `maskrcnn[export]` are missing.
    """
    outs = [Path(out) for out in outs]
    try:
        from maskrcnn.export.quantize import quantize_backbone

        if calibration is None:
            return export_model(model.cpu(), outs, class_names=class_names, opset=opset), None
        with tempfile.TemporaryDirectory() as work:
            fp32 = Path(work) / "fp32.onnx"
            info = export_model(model.cpu(), fp32, class_names=class_names, opset=opset)
            for out in outs:
                out.parent.mkdir(parents=True, exist_ok=True)
            convolutions = quantize_backbone(fp32, outs[0], calibration)
            for out in outs[1:]:  # the same int8 model: calibrated once, copied
                shutil.copyfile(outs[0], out)
            return info, convolutions
    except ImportError as error:
        raise UserError(f"ONNX export needs the optional packages of `pip install maskrcnn[export]` ({error})") \
            from None

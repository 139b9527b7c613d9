"""A trained model written for a runtime: ONNX (optionally with its backbone and FPN in static int8) or a
torch.export program, through `maskrcnn.export`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from maskrcnn.app.predict import calibration_images
from maskrcnn.engine.checkpoint import load_model, load_torchvision_model
from maskrcnn.errors import UserError
from maskrcnn.export import ExportInfo, contract, export_model
from maskrcnn.export.exporter import DEFAULT_OPSET, SUFFIXES


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


def run_export(checkpoint: str | Path, outs: Sequence[str | Path], *, torchvision: bool, opset: int | None,
               int8: str | Path | None, overrides: list[str]) -> list[str]:
    """`maskrcnn export`: the checkpoint (ours, or with `torchvision` a torchvision state dict) written to each of
    `outs`, with `int8` a folder of calibration images; returns the lines to print (files, contract, classes).

    Raises:
        UserError: a bad file name, checkpoint or calibration folder; the export packages are missing.
    """
    opset = opset or DEFAULT_OPSET
    outs = [Path(out) for out in outs]
    check_export_targets(outs, int8=int8 is not None)
    calibration = calibration_images(int8) if int8 is not None else None
    if torchvision:
        model, class_names = load_torchvision_model(checkpoint), None
    else:
        loaded = load_model(checkpoint, overrides=overrides)
        model, class_names = loaded.model, [c["name"] for c in loaded.categories]
    info, convolutions = export_for_runtime(model, outs, class_names=class_names, opset=opset,
                                            calibration=calibration)
    lines = []
    for out in outs:
        if calibration is not None:
            kind = (f"ONNX (opset {opset}) with the backbone and FPN in static int8 ({convolutions} convolutions, "
                    f"calibrated on {len(calibration)} images of {int8}), run it with ONNX Runtime on the CPU")
        elif out.suffix == ".onnx":
            kind = f"ONNX (opset {opset}), run it with ONNX Runtime"
        else:
            kind = "torch.export ExportedProgram, load it with torch.export.load"
        lines.append(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {kind}")
    return [*lines, contract(info), f"classes: {', '.join(info.class_names)}",
            f"run it: maskrcnn predict {outs[0]} IMAGES... --out DIR"]

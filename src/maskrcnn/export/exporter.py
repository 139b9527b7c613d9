"""Writes a `MaskRCNN` as an ONNX file (`.onnx`, run by ONNX Runtime) or a torch.export ExportedProgram (`.pt2`).

Both hold the same graph (`DetectAdapter`: `MaskRCNN.detect` as written) with the same contract (`contract`), and
carry the few facts a predictor needs besides the graph (class names, mask paste mode) as JSON: ONNX metadata key
"maskrcnn", or the `.pt2` extra file "maskrcnn.json".
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from maskrcnn.errors import UserError
from maskrcnn.export.adapter import OUTPUT_NAMES, DetectAdapter
from maskrcnn.model.maskrcnn import MaskRCNN

# RoiAlign with half-pixel coordinates (aligned=True) needs opset >= 16; 18 is what onnxscript's torch ops target
DEFAULT_OPSET = 18
METADATA_KEY = "maskrcnn"
PT2_EXTRA_FILE = "maskrcnn.json"
SUFFIXES = (".onnx", ".pt2")
# smallest input side: the ResNet stem and the FPN's p6 need a few pixels; smaller images are refused by the graph
MIN_INPUT_SIZE = 32


@dataclass(frozen=True)
class ExportInfo:
    """What a predictor needs besides the graph; stored with it.

    Attributes:
        class_names: names of the labels 1..K.
        paste_mode: "exact" or "torchvision", how the box-relative masks are pasted (`postprocess.paste_masks`).
        detections_per_img: D, rows per image of every output.
        mask_size: M, side of the box-relative masks.
    """

    class_names: list[str]
    paste_mode: str
    detections_per_img: int
    mask_size: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str, source: str) -> ExportInfo:
        try:
            info = cls(**json.loads(text))
        except (TypeError, ValueError, RecursionError) as error:
            raise ValueError(f"{source}: its {METADATA_KEY!r} metadata is not what `maskrcnn export` writes "
                             f"({str(error)[:200]})") from None
        names_ok = isinstance(info.class_names, list) and all(isinstance(n, str) for n in info.class_names)
        sizes_ok = all(type(v) is int and v > 0 for v in (info.detections_per_img, info.mask_size))
        if not (names_ok and info.class_names and sizes_ok and info.paste_mode in ("exact", "torchvision")):
            raise ValueError(f"{source}: its {METADATA_KEY!r} metadata is not what `maskrcnn export` writes "
                             f"({text[:120]})")
        return info


def contract(info: ExportInfo) -> str:
    """The input/output contract of an exported graph, as printed by `maskrcnn export`."""
    D, M, K = info.detections_per_img, info.mask_size, len(info.class_names)
    return "\n".join([
        f"input  images          float32 [B, 3, H, W]  RGB in 0..1; B, H, W dynamic (H, W >= {MIN_INPUT_SIZE}); "
        "one size per batch",
        f"output boxes           float32 [B, {D}, 4]  xyxy in input pixels",
        f"       scores          float32 [B, {D}]",
        f"       labels          int64   [B, {D}]  1..{K}",
        f"       masks           float32 [B, {D}, {M}, {M}]  probabilities inside each box (paste: {info.paste_mode})",
        "       num_detections  int64   [B]  rows past it are zero",
    ])


def export_info(model: MaskRCNN, class_names: list[str] | None = None) -> ExportInfo:
    """The `ExportInfo` of `model`; class names default to "class 1".."class K"."""
    K = model.box_head.num_classes
    names = list(class_names) if class_names else [f"class {k}" for k in range(1, K + 1)]
    if len(names) != K:
        raise ValueError(f"export: {len(names)} class names given for a model of {K} classes")
    return ExportInfo(class_names=names, paste_mode=model.paste_mode,
                      detections_per_img=model.box_head.detections_per_img, mask_size=model.mask_head.mask_size)


def export_program(model: MaskRCNN) -> torch.export.ExportedProgram:
    """torch.export of `model.detect` (`DetectAdapter`) with dynamic batch size, height and width."""
    graph = DetectAdapter(model)
    # an example batch of 2 distinct sides: size 1 and equal sides would be specialised (torch.export's 0/1 and
    # duck-sizing rules)
    example = torch.rand(2, 3, 3 * MIN_INPUT_SIZE, 4 * MIN_INPUT_SIZE)
    dims = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height", min=MIN_INPUT_SIZE),
            3: torch.export.Dim("width", min=MIN_INPUT_SIZE)}
    with torch.no_grad():
        return torch.export.export(graph, (example,), dynamic_shapes={"images": dims})


def export_model(model: MaskRCNN, paths: str | Path | Sequence[str | Path], *,
                 class_names: list[str] | None = None, opset: int = DEFAULT_OPSET) -> ExportInfo:
    """Exports `model` to each of `paths` from one trace: ONNX where a path ends in .onnx, an ExportedProgram where
    it ends in .pt2.

    Returns:
        the ExportInfo stored with the graph.
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(path) for path in paths]
    for path in paths:
        _check_target(path, opset)
    info = export_info(model, class_names)
    program = export_program(model)
    # .pt2 first: the ONNX translation decomposes the program, and a program is translated only once (a second
    # translation fails in torch.export's unbacked sizes), so further .onnx files are copies of the first
    pt2, onnx = [p for p in paths if p.suffix == ".pt2"], [p for p in paths if p.suffix == ".onnx"]
    for path in pt2 + onnx[:1]:
        save_program(program, info, path, opset=opset)
    for path in onnx[1:]:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(onnx[0], path)
    return info


def save_program(program: torch.export.ExportedProgram, info: ExportInfo, path: str | Path, *,
                 opset: int = DEFAULT_OPSET) -> None:
    """Writes an `export_program` result with its ExportInfo: .pt2 as is, .onnx translated to ONNX (once per
    program: the translation decomposes it, and torch.export fails on a second one)."""
    path = Path(path)
    _check_target(path, opset)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pt2":
        torch.export.save(program, path, extra_files={PT2_EXTRA_FILE: info.to_json()})
        return
    import onnx

    onnx_program = torch.onnx.export(program, input_names=["images"], output_names=list(OUTPUT_NAMES),
                                     opset_version=opset, dynamo=True, verbose=False)
    proto = onnx_program.model_proto
    _resize_sizes_in_double(proto)
    onnx.helper.set_model_props(proto, {METADATA_KEY: info.to_json()})
    onnx.save(proto, str(path))


def _check_target(path: str | Path, opset: int) -> None:
    """Before the trace (tens of seconds): a known suffix, opset 16 or later, and a folder a file can be written
    into (created if missing), else a one-line error naming the file."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"export: {path}: the file name must end in .onnx (ONNX) or .pt2 (torch.export)")
    if opset < 16:
        raise ValueError(f"export: opset {opset} < 16 has no half-pixel RoiAlign; use 16 or later")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as error:
        raise UserError(f"export: {path}: cannot be written in {path.parent} ({error.strerror or error})") from None


# ops through which a size computed from the input's shape flows to the Floor of the resized size
_SIZE_OPS = {"Cast", "Squeeze", "Unsqueeze", "Reshape", "Min", "Max", "Div", "Mul", "Add", "Sub"}


def _resize_sizes_in_double(proto) -> None:
    """Computes the resized image size of the ONNX graph in float64, as eager PyTorch does.

    The eager transform computes floor(H * min(min_size / short, max_size / long)) in Python floats (float64);
    the ONNX translation of those symbolic sizes computes it in float32, which differs by one pixel for about
    1 in 10 image sizes (e.g. 100 x 295 resized to 451 x 1333 in float64, 451 x 1332 in float32) and so changes
    every detection a little. Every float -> int step over shape values (Floor, or trunc as a Cast to int64, of a
    size, not of a data tensor) gets a float64 copy of the float32 computation that feeds it: Casts to float64
    instead of float32, float64 constants. The float32 originals stay for their other consumers.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    producer = {output: node for node in graph.node for output in node.output}
    initializers = {init.name: init for init in graph.initializer}
    elem_type = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input]}
    elem_type.update({init.name: init.data_type for init in graph.initializer})

    def is_size(name: str) -> bool:
        node = producer.get(name)
        if name in initializers or (node is not None and node.op_type == "Shape"):
            return True
        return node is not None and node.op_type in _SIZE_OPS and all(is_size(i) for i in node.input if i)

    doubles: dict[str, str] = {}  # float32 value -> its float64 copy
    new_nodes: list = []

    def double_of(name: str) -> str:
        if name in doubles:
            return doubles[name]
        node = producer.get(name)
        if name in initializers:
            if initializers[name].data_type != TensorProto.FLOAT:
                return name
            copy = numpy_helper.from_array(numpy_helper.to_array(initializers[name]).astype("float64"),
                                           f"{name}_float64")
            graph.initializer.append(copy)
        elif node.op_type == "Cast":
            if node.attribute[0].i != TensorProto.FLOAT:
                return name
            new_nodes.append(helper.make_node("Cast", list(node.input), [f"{name}_float64"], to=TensorProto.DOUBLE))
        elif elem_type.get(name) != TensorProto.FLOAT:
            return name
        else:
            inputs = [double_of(i) if i else i for i in node.input]
            new_nodes.append(helper.make_node(node.op_type, inputs, [f"{name}_float64"]))
        doubles[name] = f"{name}_float64"
        return doubles[name]

    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def is_cast_to_int64(node) -> bool:
        return node.op_type == "Cast" and node.attribute[0].i == TensorProto.INT64

    # the float -> int step of a size: floor(), or trunc() (a Cast to int64), of a float computed from the shape
    for node in list(graph.node):
        is_floor = node.op_type == "Floor"
        if not ((is_floor or is_cast_to_int64(node)) and elem_type.get(node.input[0]) == TensorProto.FLOAT
                and is_size(node.input[0])):
            continue
        if is_floor and not all(is_cast_to_int64(c) for c in consumers.get(node.output[0], [])):
            raise RuntimeError(f"export: the resized size {node.output[0]} is used other than as an integer")
        new_nodes.clear()
        node.input[0] = double_of(node.input[0])
        position = list(graph.node).index(node)
        for offset, new_node in enumerate(new_nodes):  # dependencies first: created in post-order
            graph.node.insert(position + offset, new_node)
        if is_floor:
            elem_type[node.output[0]] = TensorProto.DOUBLE  # its Cast to int64 is then no float -> int step
            for value in graph.value_info:
                if value.name == node.output[0]:
                    value.type.tensor_type.elem_type = TensorProto.DOUBLE
    onnx.checker.check_model(proto)

"""Running an exported model: ONNX Runtime (or OpenVINO) for `.onnx` files, the ExportedProgram for `.pt2` files.

A predictor takes images like the eager model (a list of f32[3, H, W] in 0..1) and returns the eager model's
per-image dicts: the graph's padded outputs cut to `num_detections`, and its box-relative masks pasted into the
image by the package's own `paste_masks` (the same paste, mode included, as the model the graph came from).

Shape letters: B images, D detections per image (padded), D_i detections of image i, M mask size.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from maskrcnn.export.adapter import OUTPUT_NAMES
from maskrcnn.export.exporter import METADATA_KEY, PT2_EXTRA_FILE, SUFFIXES, ExportInfo
from maskrcnn.export.pt2_check import check_pt2_archive
from maskrcnn.model.box_head import Detections
from maskrcnn.model.mask_rle import MASK_FORMATS, detections_in_format
from maskrcnn.model.precision import PrecisionError, cpu_has_bf16

# runtimes of an .onnx file: the first is the default
ONNX_RUNTIMES = ("onnxruntime", "openvino")
# the loggers torch.export.load writes a failed load's traceback to (kept off the terminal: one line instead)
_TORCH_EXPORT_LOGGERS = ("torch.export", "torch.export.pt2_archive._package", "torch._export.serde.serialize")


class _Collected(logging.Handler):
    """Keeps the records logged to it instead of printing them."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def torch_export_logs_kept():
    """Keeps what torch.export's loggers and warnings say for the duration off the terminal: a file that does not
    load is one line. Yields the handler holding the log records (a failed load logs its cause there)."""
    loggers = [logging.getLogger(name) for name in _TORCH_EXPORT_LOGGERS]
    saved = [(logger.handlers, logger.propagate) for logger in loggers]
    collected = _Collected()
    for logger in loggers:  # torch attaches its own terminal handler to some of them
        logger.handlers, logger.propagate = [collected], False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield collected
    finally:
        for logger, (handlers, propagate) in zip(loggers, saved):
            logger.handlers, logger.propagate = handlers, propagate


def _load_failure(error: Exception, collected: _Collected) -> str:
    """The first line of why torch.export.load failed: the error it logged (its own message then points to the
    warnings it printed), else the error it raised."""
    causes = [record.exc_info[1] for record in collected.records if record.exc_info and record.exc_info[1]]
    cause = causes[-1] if causes else error
    lines = str(cause).strip().splitlines()
    return (lines[0] if lines else type(cause).__name__)[:200]


def unpad_detections(outputs: dict[str, Tensor], image_size: tuple[int, int], paste_mode: str,
                     masks: str = "dense") -> list[dict]:
    """The graph's padded outputs of one batch -> the eager model's per-image dicts (`detections_in_format`).

    Args:
        outputs: {"boxes" f32[B, D, 4], "scores" f32[B, D], "labels" i64[B, D], "masks" f32[B, D, M, M],
            "num_detections" i64[B]}.
        image_size: (H, W) of the batch's images.
        paste_mode: "exact" or "torchvision" (`ExportInfo.paste_mode`).
        masks: "dense", "rle" or "boxed", as `MaskRCNN.inference`.
    Returns:
        B dicts {"boxes" f32[D_i, 4], "labels" i64[D_i], "scores" f32[D_i], "masks"}, "masks" f32[D_i, 1, H, W]
        (dense), D_i COCO RLE dicts (rle) or a `BoxMasks` (boxed).
    """
    B, D = outputs["scores"].shape
    valid = torch.arange(D)[None, :] < outputs["num_detections"][:, None]  # (B, D), a prefix of every row
    detections = Detections(boxes=outputs["boxes"], scores=outputs["scores"], labels=outputs["labels"], valid=valid,
                            masks=outputs["masks"])
    return detections_in_format(detections, [tuple(image_size)] * B, paste_mode, masks)


def onnx_export_info(metadata: str | None, path: Path) -> ExportInfo:
    """The ExportInfo of an .onnx file from its METADATA_KEY metadata as read by a runtime (None: it has none)."""
    if metadata is None:
        raise ValueError(f"{path}: no {METADATA_KEY!r} metadata; it was not written by `maskrcnn export`")
    return ExportInfo.from_json(metadata, str(path))


def check_graph_names(inputs: list[str], outputs: list[str], path: Path) -> None:
    """Raises ValueError naming `path` unless the graph takes "images" and gives every one of OUTPUT_NAMES (a
    graph with our metadata and other names would fail at its first run)."""
    missing = [name for name in OUTPUT_NAMES if name not in outputs]
    if inputs != ["images"] or missing:
        raise ValueError(f"{path}: a graph of inputs {inputs} and outputs {outputs}; `maskrcnn export` writes input "
                         f"['images'] and outputs {list(OUTPUT_NAMES)}")


class Predictor:
    """Common part of the ONNX Runtime and ExportedProgram predictors; `run` is what differs."""

    info: ExportInfo

    def run(self, images: Tensor) -> dict[str, Tensor]:
        """f32[B, 3, H, W] -> the graph's padded outputs by name (`graph.OUTPUT_NAMES`), as CPU tensors."""
        raise NotImplementedError

    def __call__(self, images: Sequence[Tensor], *, masks: str = "dense") -> list[dict]:
        """Detections of images f32[3, H, W] in 0..1, as the eager model's `inference(images, masks=masks)`:
        masks "dense" (pasted into the image), "rle" (COCO RLE, never pasted densely) or "boxed" (`BoxMasks`).
        Images of one size run as one batch; otherwise one at a time (the graph takes one size per batch)."""
        if masks not in MASK_FORMATS:
            raise ValueError(f"Predictor: masks must be one of {MASK_FORMATS}, got {masks!r}")
        if not images:
            return []
        sizes = {tuple(image.shape) for image in images}
        if len(sizes) > 1:
            return [detections for image in images for detections in self([image], masks=masks)]
        batch = torch.stack([image.float().cpu() for image in images])
        return unpad_detections(self.run(batch), tuple(batch.shape[-2:]), self.info.paste_mode, masks)


class OnnxPredictor(Predictor):
    """An exported `.onnx` model in ONNX Runtime: the CUDA execution provider when onnxruntime-gpu offers it,
    else the CPU one.

    Args:
        path: the .onnx file written by `maskrcnn export`.
        providers: ONNX Runtime execution providers in order of preference; None: CUDA if available, then CPU.
        threads: intra-op threads of the CPU provider; None: ONNX Runtime's default (one per core).
        optimization: graph optimisation level, "disable", "basic", "extended" or "all".
    """

    def __init__(self, path: str | Path, *, providers: Sequence[str] | None = None, threads: int | None = None,
                 optimization: str = "all") -> None:
        import onnxruntime as ort

        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if optimization not in levels:
            raise ValueError(f"OnnxPredictor: optimization must be one of {sorted(levels)}, got {optimization!r}")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[optimization]
        if threads is not None:
            options.intra_op_num_threads = threads
        # no busy-waiting of the threads between ops: they would compete with the torch work that follows a run (the
        # mask paste), and the run itself was faster without (ResNet-50 FPN, 800x1088, 2 threads: 2.55 against 2.75 s)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as error:  # ONNX Runtime raises its own exception types for unreadable / invalid files
            raise ValueError(f"{path}: not a loadable ONNX model ({error})") from None
        self.info = onnx_export_info(self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), path)
        check_graph_names([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()],
                          path)

    def run(self, images: Tensor) -> dict[str, Tensor]:
        values = self.session.run(list(OUTPUT_NAMES), {"images": images.float().contiguous().numpy()})
        return {name: torch.from_numpy(value) for name, value in zip(OUTPUT_NAMES, values)}


class OpenVinoPredictor(Predictor):
    """An exported `.onnx` model in OpenVINO on the CPU (the optional extra `maskrcnn[openvino]`).

    Why a second ONNX runtime: on the project's AMD EPYC (AVX-512 BF16) OpenVINO ran our ResNet-50 export faster
    than ONNX Runtime, and its bf16 mode uses the CPU's bf16 units (benchmarks/cpu_limit.py, RESULTS.md).
    One difference from the eager model: OpenVINO's CPU plugin runs the graph's float64 arithmetic in float32, and
    the graph computes the resized image size in float64 (`exporter._resize_sizes_in_double`), so for about 1 in
    10 image sizes OpenVINO resizes the image one pixel shorter or longer than the eager model does.

    Args:
        path: the .onnx file written by `maskrcnn export`.
        precision: "fp32", or "bf16" (OpenVINO's bf16 inference precision hint: convolutions and matrix multiplies
            in bf16; needs AVX-512 BF16 or AMX, refused with a PrecisionError on a CPU without them).
        threads: inference threads; None: OpenVINO's default (one per core).
    """

    def __init__(self, path: str | Path, *, precision: str = "fp32", threads: int | None = None) -> None:
        if precision not in ("fp32", "bf16"):
            raise PrecisionError(f"--precision {precision}: OpenVINO runs an exported model in fp32 or bf16")
        if precision == "bf16" and not cpu_has_bf16():
            raise PrecisionError("--precision bf16: this CPU has no bf16 units (AVX-512 BF16 or AMX); use fp32")
        import openvino

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        core = openvino.Core()
        try:
            model = core.read_model(str(path))
        except Exception as error:  # OpenVINO raises its own exception types for unreadable / invalid files
            raise ValueError(f"{path}: not a loadable ONNX model ({error})") from None
        # OpenVINO keeps an ONNX file's metadata_props under the "framework" runtime-info section
        key = ["framework", METADATA_KEY]
        self.info = onnx_export_info(model.get_rt_info(key).astype(str) if model.has_rt_info(key) else None, path)
        check_graph_names([i.get_any_name() for i in model.inputs],
                          [name for output in model.outputs for name in output.get_names()], path)
        config = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision]}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(model, "CPU", config)

    def run(self, images: Tensor) -> dict[str, Tensor]:
        result = self.compiled([images.float().contiguous().numpy()])
        return {name: torch.from_numpy(result[name]) for name in OUTPUT_NAMES}


class ProgramPredictor(Predictor):
    """An ExportedProgram of `export_program`, run by PyTorch (on `device`); `load` reads a `.pt2` file."""

    def __init__(self, program: torch.export.ExportedProgram, info: ExportInfo, *,
                 device: str | torch.device = "cpu") -> None:
        self.info = info
        self.device = torch.device(device)
        self.module = program.module().to(self.device)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> ProgramPredictor:
        """The predictor of a .pt2 file written by `maskrcnn export` (loading takes tens of seconds)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ExportedProgram not found: {path}")
        check_pt2_archive(path)  # torch.export.load would run the code a crafted file holds
        extra = {PT2_EXTRA_FILE: ""}
        with torch_export_logs_kept() as collected:
            try:
                program = torch.export.load(path, extra_files=extra)
            except Exception as error:  # torch raises several types for a corrupt or foreign archive
                raise ValueError(f"{path}: not a loadable ExportedProgram ({_load_failure(error, collected)})") \
                    from None
        if not extra[PT2_EXTRA_FILE]:
            raise ValueError(f"{path}: no {PT2_EXTRA_FILE}; it was not written by `maskrcnn export`")
        signature = program.graph_signature
        if len(signature.user_inputs) != 1 or len(signature.user_outputs) != len(OUTPUT_NAMES):
            raise ValueError(f"{path}: a program of {len(signature.user_inputs)} inputs and "
                             f"{len(signature.user_outputs)} outputs; `maskrcnn export` writes 1 input (images) and "
                             f"{len(OUTPUT_NAMES)} outputs ({', '.join(OUTPUT_NAMES)})")
        return cls(program, ExportInfo.from_json(extra[PT2_EXTRA_FILE], str(path)), device=device)

    @torch.no_grad()
    def run(self, images: Tensor) -> dict[str, Tensor]:
        values = self.module(images.to(self.device))
        return {name: value.cpu() for name, value in zip(OUTPUT_NAMES, values)}


def load_predictor(path: str | Path, *, runtime: str | None = None, precision: str | None = None) -> Predictor:
    """The predictor of an exported file, chosen by its suffix (.onnx: ONNX Runtime, or OpenVINO when `runtime` is
    "openvino"; .pt2: ExportedProgram).

    Args:
        runtime: one of ONNX_RUNTIMES for an .onnx file; None: the first.
        precision: OpenVINO's "fp32" (None) or "bf16"; the other runtimes run the graph as exported and refuse it.
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: not an exported model (suffix {path.suffix!r}, expected one of {SUFFIXES})")
    if runtime is not None and path.suffix == ".pt2":
        raise ValueError(f"--runtime {runtime}: {path} runs only in PyTorch")
    if runtime not in (None, *ONNX_RUNTIMES):
        raise ValueError(f"--runtime {runtime}: {path} runs only in one of {', '.join(ONNX_RUNTIMES)}")
    if runtime == "openvino":
        return OpenVinoPredictor(path, precision=precision or "fp32")
    if precision is not None:
        raise PrecisionError(f"--precision {precision}: {path} runs in the precision it was exported in (fp32); "
                             f"bf16 is offered by --runtime openvino")
    return OnnxPredictor(path) if path.suffix == ".onnx" else ProgramPredictor.load(path)


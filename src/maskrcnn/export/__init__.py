"""Export of a trained model with a fixed batched contract (ONNX, torch.export) and predictors that run it.

`onnx` and `onnxruntime` are the optional extra `maskrcnn[export]`, `openvino` the extra `maskrcnn[openvino]`;
they are imported only when used.
"""

from maskrcnn.export.adapter import OUTPUT_NAMES, DetectAdapter
from maskrcnn.export.exporter import ExportInfo, contract, export_model, export_program
from maskrcnn.export.runtime import (ONNX_RUNTIMES, OnnxPredictor, OpenVinoPredictor, ProgramPredictor, load_predictor,
                                     unpad_detections)

__all__ = ["ONNX_RUNTIMES", "OUTPUT_NAMES", "DetectAdapter", "ExportInfo", "OnnxPredictor", "OpenVinoPredictor",
           "ProgramPredictor", "contract", "export_model", "export_program", "load_predictor", "unpad_detections"]

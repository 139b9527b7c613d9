"""Export of a trained model with a fixed batched contract (ONNX, torch.export) and predictors that run it.

`onnx` and `onnxruntime` are the optional extra `maskrcnn[export]`; they are imported only when used.
"""

from maskrcnn.export.adapter import OUTPUT_NAMES, DetectAdapter
from maskrcnn.export.exporter import ExportInfo, contract, export_model, export_program
from maskrcnn.export.runtime import OnnxPredictor, ProgramPredictor, load_predictor, unpad_detections

__all__ = ["OUTPUT_NAMES", "DetectAdapter", "ExportInfo", "OnnxPredictor", "ProgramPredictor", "contract",
           "export_model", "export_program", "load_predictor", "unpad_detections"]

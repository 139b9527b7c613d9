"""CPU inference time of the exported ONNX graph in ONNX Runtime against our eager model and torchvision's eager
`maskrcnn_resnet50_fpn`: same weights, same images (800 x 1088), batch 1 and 2, all in one run.

The weights are a randomly initialised torchvision model (no download possible on the project's machines),
converted by `from_torchvision`, with the class logits scaled up so that, as with trained weights, detections
pass the score threshold and the mask head and paste run on 100 detections per image (with raw random weights
every class probability is about 1/91, below the 0.05 threshold, and the mask head would get no work).
Every time includes the mask paste into the image (torchvision's outputs are pasted; ONNX Runtime's box-relative
masks are pasted by the package's `paste_masks`); "graph only" is ONNX Runtime's `session.run` alone.

ONNX Runtime settings: graph optimisation level "all" (and "basic" for comparison), intra-op threads = torch's
threads; with --int8, dynamic int8 quantisation (onnxruntime.quantization.quantize_dynamic) of the Conv and MatMul
weights.

    python benchmarks/export_onnxruntime.py --out benchmarks/export_onnxruntime.json
    (export first, unlocked, then take the exclusive CPU lock for the timings only:)
    python benchmarks/export_onnxruntime.py --export-only --model /tmp/bench/model.onnx
    flock -x /work/cpu.lock python benchmarks/export_onnxruntime.py --model /tmp/bench/model.onnx --out ...

The int8 accuracy cost is measured on the demo's held-out images by `--demo-checkpoint runs/demo/last.pt`:
mask and box mAP@0.5 of the eager model, ONNX Runtime fp32 and ONNX Runtime int8 on the same images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn

from maskrcnn.export import OnnxPredictor, export_model
from maskrcnn.model import from_torchvision

SIZE = (800, 1088)
PENNFUDAN = Path(os.environ.get("MASKRCNN_PENNFUDAN", Path(__file__).resolve().parents[2] / "shared/data/PennFudanPed"))


def torchvision_model() -> nn.Module:
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()  # 91 COCO classes
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(10.0)
    return model


def images(count: int) -> list[torch.Tensor]:
    """`count` photos f32[3, 800, 1088] in 0..1: Penn-Fudan resized when present, else smooth random blobs."""
    files = sorted((PENNFUDAN / "PNGImages").glob("*.png"))[:count] if PENNFUDAN.is_dir() else []
    out = []
    for file in files:
        image = torch.from_numpy(np.array(Image.open(file).convert("RGB"))).permute(2, 0, 1).float() / 255
        out.append(torch.nn.functional.interpolate(image[None], size=SIZE, mode="bilinear")[0])
    generator = torch.Generator().manual_seed(0)
    while len(out) < count:
        blobs = torch.rand(3, SIZE[0] // 32, SIZE[1] // 32, generator=generator)
        out.append(blobs.repeat_interleave(32, 1).repeat_interleave(32, 2))
    return out


def time_it(fn, repeats: int) -> dict:
    fn()  # warm-up: caches, oneDNN primitives, ONNX Runtime's first-run allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": times}


def quantized(model_path: Path) -> Path:
    """Dynamic int8 quantisation of the Conv and MatMul weights (activations quantised at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = model_path.with_name(model_path.stem + "_int8.onnx")
    quantize_dynamic(str(model_path), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "MatMul"])
    return out


def timings(args: argparse.Namespace) -> dict:
    tv = torchvision_model()
    ours = from_torchvision(tv)
    torch.set_num_threads(args.threads)
    batch_images = images(2)
    results: dict = {"machine": platform.processor() or platform.machine(), "torch_threads": args.threads,
                     "size": SIZE, "torch": torch.__version__, "cases": {}}
    predictor = OnnxPredictor(args.model, threads=args.threads, optimization="all")
    basic = OnnxPredictor(args.model, threads=args.threads, optimization="basic")
    int8 = OnnxPredictor(quantized(Path(args.model)), threads=args.threads, optimization="all") if args.int8 else None
    import onnxruntime

    results["onnxruntime"] = onnxruntime.__version__
    for batch in (1, 2):
        chunk = batch_images[:batch]
        stacked = torch.stack(chunk)
        case: dict = {}
        with torch.no_grad():
            case["torchvision eager"] = time_it(lambda: tv(chunk), args.repeats)
            case["ours eager"] = time_it(lambda: ours(chunk), args.repeats)
        case["onnxruntime"] = time_it(lambda: predictor(chunk), args.repeats)
        case["onnxruntime graph only"] = time_it(lambda: predictor.run(stacked), args.repeats)
        case["onnxruntime graph only, basic optimisation"] = time_it(lambda: basic.run(stacked), args.repeats)
        if int8 is not None:
            case["onnxruntime int8"] = time_it(lambda: int8(chunk), args.repeats)
        reference = case["torchvision eager"]["median_s"]
        for entry in case.values():
            entry["vs_torchvision"] = entry["median_s"] / reference
        results["cases"][f"batch {batch}"] = case
        for name, entry in case.items():
            print(f"batch {batch}  {name:45s} {entry['median_s']:7.2f} s  {entry['vs_torchvision']:.2f}x torchvision",
                  flush=True)
    return results


class _PredictorModule(nn.Module):
    """A predictor behind the nn.Module interface `engine.evaluate` calls (eval(), __call__)."""

    def __init__(self, predictor) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, images):
        return self.predictor(images)


def int8_accuracy(args: argparse.Namespace) -> dict:
    """Box and mask mAP@0.5 on the demo's held-out images: eager, ONNX Runtime fp32, ONNX Runtime int8."""
    from maskrcnn.cli import _build_for_checkpoint
    from maskrcnn.data import build_dataset
    from maskrcnn.data.loader import build_eval_loader
    from maskrcnn.engine.evaluate import evaluate

    cfg, model, device, class_names = _build_for_checkpoint(args.demo_checkpoint, None, [])
    onnx_path = Path(args.work) / "demo.onnx"
    export_model(model, onnx_path, class_names=class_names)
    dataset = build_dataset(cfg.data, "val")
    candidates = {"eager": model, "onnxruntime fp32": _PredictorModule(OnnxPredictor(onnx_path)),
                  "onnxruntime int8": _PredictorModule(OnnxPredictor(quantized(onnx_path)))}
    out = {"checkpoint": str(args.demo_checkpoint), "num_images": len(dataset)}
    for name, candidate in candidates.items():
        loader = build_eval_loader(dataset, batch_size=cfg.eval.batch_size)
        metrics = evaluate(candidate, loader, class_names=class_names, device=torch.device("cpu"),
                           iou_thresh=cfg.eval.iou_thresh).metrics
        out[name] = {"box_mAP50": metrics["voc"]["bbox"]["mAP"], "mask_mAP50": metrics["voc"]["segm"]["mAP"],
                     "mask_AP": metrics["segm"]["AP"]}
        print(f"{name:20s} box mAP@0.5 {out[name]['box_mAP50']:.4f}  mask mAP@0.5 {out[name]['mask_mAP50']:.4f}  "
              f"mask AP {out[name]['mask_AP']:.4f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="/tmp/maskrcnn_bench/model.onnx", help="ONNX file (exported if missing)")
    parser.add_argument("--export-only", action="store_true", help="export the ONNX file and stop")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--int8", action="store_true", help="also time dynamic int8 quantisation")
    parser.add_argument("--demo-checkpoint", help="measure int8's accuracy cost on this demo checkpoint's val set")
    parser.add_argument("--work", default="/tmp/maskrcnn_bench", help="folder for the demo model's ONNX files")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if not Path(args.model).is_file():
        export_model(from_torchvision(torchvision_model()), args.model)
        print(f"exported {args.model}")
    if args.export_only:
        return
    results = {} if args.demo_checkpoint else timings(args)
    if args.demo_checkpoint:
        results["int8_accuracy"] = int8_accuracy(args)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

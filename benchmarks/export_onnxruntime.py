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
weights; with --int8-static, static int8 quantisation of the backbone and FPN only (`maskrcnn.export.quantize`, what
`maskrcnn export --int8 DIR` writes), calibrated on real images (Penn-Fudan photos other than the timed ones; the
demo's training images for --demo-checkpoint).
--onnx-only leaves out the eager rows and the "basic" row (a shorter run under the CPU lock).

    python benchmarks/export_onnxruntime.py      # writes benchmarks/results/export_onnxruntime.json
    (export first, unlocked, then take the exclusive CPU lock for the timings only:)
    python benchmarks/export_onnxruntime.py --export-only --model /tmp/bench/model.onnx [--int8] [--int8-static]
    flock -x /work/cpu.lock python benchmarks/export_onnxruntime.py --model /tmp/bench/model.onnx --out ...
The quantised models are written next to the fp32 one (model_int8.onnx, model_int8_static.onnx) and, like the
fp32 one, made only when missing.

The int8 accuracy cost is measured on the demo's held-out images by `--demo-checkpoint runs/demo/last.pt`:
mask and box mAP@0.5 of the eager model, ONNX Runtime fp32 and ONNX Runtime int8 (dynamic, and static with
--int8-static) on the same images, written to benchmarks/results/export_onnxruntime_int8.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
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
RESULTS = Path(__file__).resolve().parent / "results"


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
    """Dynamic int8 quantisation of the Conv and MatMul weights (activations quantised at run time); made only
    when the file is missing."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = model_path.with_name(model_path.stem + "_int8.onnx")
    if not out.is_file():
        quantize_dynamic(str(model_path), str(out), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["Conv", "MatMul"])
    return out


def static_quantized(model_path: Path, calibration: list[torch.Tensor]) -> Path:
    """Static int8 quantisation of the backbone and FPN (`maskrcnn.export.quantize.quantize_backbone`), calibrated
    on `calibration` images f32[3, H, W]; made only when the file is missing."""
    from maskrcnn.export.quantize import quantize_backbone

    out = model_path.with_name(model_path.stem + "_int8_static.onnx")
    if not out.is_file():
        quantize_backbone(model_path, out, calibration)
    return out


def timings(args: argparse.Namespace) -> dict:
    tv = torchvision_model()
    ours = from_torchvision(tv)
    torch.set_num_threads(args.threads)
    batch_images = images(2)
    static = static_model(args)
    results: dict = {"machine": platform.processor() or platform.machine(), "torch_threads": args.threads,
                     "size": SIZE, "torch": torch.__version__, "cases": {}}
    predictor = OnnxPredictor(args.model, threads=args.threads, optimization="all")
    basic = OnnxPredictor(args.model, threads=args.threads, optimization="basic")
    int8 = OnnxPredictor(quantized(Path(args.model)), threads=args.threads, optimization="all") if args.int8 else None
    int8_static = OnnxPredictor(static, threads=args.threads, optimization="all") if static else None
    import onnxruntime

    results["onnxruntime"] = onnxruntime.__version__
    for batch in (1, 2):
        chunk = batch_images[:batch]
        stacked = torch.stack(chunk)
        case: dict = {}
        if not args.onnx_only:
            with torch.no_grad():
                case["torchvision eager"] = time_it(lambda: tv(chunk), args.repeats)
                case["ours eager"] = time_it(lambda: ours(chunk), args.repeats)
        case["onnxruntime"] = time_it(lambda: predictor(chunk), args.repeats)
        case["onnxruntime graph only"] = time_it(lambda: predictor.run(stacked), args.repeats)
        if not args.onnx_only:
            case["onnxruntime graph only, basic optimisation"] = time_it(lambda: basic.run(stacked), args.repeats)
        if int8 is not None:
            case["onnxruntime int8"] = time_it(lambda: int8(chunk), args.repeats)
        if int8_static is not None:
            case["onnxruntime int8 static"] = time_it(lambda: int8_static(chunk), args.repeats)
            case["onnxruntime int8 static graph only"] = time_it(lambda: int8_static.run(stacked), args.repeats)
        reference_name = "onnxruntime graph only" if args.onnx_only else "torchvision eager"
        for entry in case.values():
            entry[f"vs {reference_name}"] = entry["median_s"] / case[reference_name]["median_s"]
        results["cases"][f"batch {batch}"] = case
        for name, entry in case.items():
            print(f"batch {batch}  {name:45s} {entry['median_s']:7.2f} s  {entry[f'vs {reference_name}']:.2f}x "
                  f"{reference_name}", flush=True)
    return results


class PredictorModule(nn.Module):
    """A predictor behind the nn.Module interface `engine.evaluate` calls (eval(), __call__)."""

    def __init__(self, predictor) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, images):
        return self.predictor(images)


def int8_accuracy(args: argparse.Namespace) -> dict:
    """Box and mask mAP@0.5 on the demo's held-out images: eager, ONNX Runtime fp32, ONNX Runtime int8."""
    from maskrcnn.data import build_dataset
    from maskrcnn.data.loader import build_eval_loader
    from maskrcnn.engine.checkpoint import load_model
    from maskrcnn.engine.common import images_to_model
    from maskrcnn.engine.evaluate import evaluate

    loaded = load_model(args.demo_checkpoint)
    cfg, model = loaded.config, loaded.model
    class_names = [category["name"] for category in loaded.categories]
    onnx_path = Path(args.work) / "demo.onnx"
    for stale in (onnx_path, onnx_path.with_name("demo_int8.onnx"), onnx_path.with_name("demo_int8_static.onnx")):
        stale.unlink(missing_ok=True)  # the quantised files are made only when missing: never another checkpoint's
    export_model(model, onnx_path, class_names=class_names)
    dataset = build_dataset(cfg.data, "val")
    candidates = {"eager": model, "onnxruntime fp32": PredictorModule(OnnxPredictor(onnx_path)),
                  "onnxruntime int8": PredictorModule(OnnxPredictor(quantized(onnx_path)))}
    if args.int8_static:
        train = build_dataset(replace(cfg.data, flip_prob=0.0), "train")  # no random flips: the same calibration
        calibration = images_to_model([train[index][0] for index in range(min(args.calibration_images, len(train)))],
                                      torch.device("cpu"))
        candidates["onnxruntime int8 static"] = PredictorModule(OnnxPredictor(static_quantized(onnx_path,
                                                                                                calibration)))
    out = {"checkpoint": str(args.demo_checkpoint), "num_images": len(dataset)}
    for name, candidate in candidates.items():
        loader = build_eval_loader(dataset, batch_size=cfg.eval.batch_size)
        metrics = evaluate(candidate, loader, class_names=class_names, device=torch.device("cpu"),
                           iou_thresh=cfg.eval.iou_thresh).metrics
        out[name] = {"box_mAP50": metrics["voc"]["bbox"]["mAP"], "mask_mAP50": metrics["voc"]["segm"]["mAP"],
                     "mask_AP": metrics["segm"]["AP"]}
        print(f"{name:24s} box mAP@0.5 {out[name]['box_mAP50']:.4f}  mask mAP@0.5 {out[name]['mask_mAP50']:.4f}  "
              f"mask AP {out[name]['mask_AP']:.4f}", flush=True)
    return out


def static_model(args: argparse.Namespace) -> Path | None:
    """The statically quantised speed model when --int8-static asks for it, calibrated on Penn-Fudan photos after
    the two timed ones."""
    if not args.int8_static:
        return None
    return static_quantized(Path(args.model), images(2 + args.calibration_images)[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="/tmp/maskrcnn_bench/model.onnx", help="ONNX file (exported if missing)")
    parser.add_argument("--export-only", action="store_true", help="export the ONNX file and stop")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--int8", action="store_true", help="also time dynamic int8 quantisation")
    parser.add_argument("--int8-static", action="store_true",
                        help="also time / measure static int8 quantisation of the backbone and FPN")
    parser.add_argument("--calibration-images", type=int, default=8, help="images that calibrate static int8")
    parser.add_argument("--onnx-only", action="store_true", help="time ONNX Runtime only (no eager, no 'basic')")
    parser.add_argument("--demo-checkpoint", help="measure int8's accuracy cost on this demo checkpoint's val set")
    parser.add_argument("--work", default="/tmp/maskrcnn_bench", help="folder for the demo model's ONNX files")
    parser.add_argument("--out", type=Path, help="the results as JSON (default: benchmarks/results/"
                        "export_onnxruntime.json, export_onnxruntime_int8.json with --demo-checkpoint)")
    args = parser.parse_args()
    if not Path(args.model).is_file():
        export_model(from_torchvision(torchvision_model()), args.model)
        print(f"exported {args.model}")
    if args.export_only:
        if args.int8:
            quantized(Path(args.model))
        static_model(args)
        return
    results = {} if args.demo_checkpoint else timings(args)
    if args.demo_checkpoint:
        results["int8_accuracy"] = int8_accuracy(args)
    out = args.out or RESULTS / ("export_onnxruntime_int8.json" if args.demo_checkpoint else "export_onnxruntime.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Accuracy of one trained checkpoint in every CPU runtime the package offers, on its own held-out images: the eager
model in fp32 and bf16 (model.precision), its ONNX export in ONNX Runtime, and in OpenVINO with the fp32 and bf16
inference precision hints (`maskrcnn predict model.onnx --runtime openvino [--precision bf16]`).

Box and mask COCO AP (0.5:0.95) and mAP@0.5 of each, with seconds per image, all on the same images in one run.
The bf16 rows need a CPU with bf16 units (AVX-512 BF16 or AMX) and are left out elsewhere; the OpenVINO rows
need the `openvino` package (`pip install maskrcnn[openvino]`).

    python benchmarks/runtime_accuracy.py /tmp/pf_lite_run/last.pt --set data.root=../shared/data/PennFudanPed

writes benchmarks/results/runtime_accuracy.json (--out elsewhere).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_onnxruntime import PredictorModule  # noqa: E402  (the benchmarks folder is not a package)

from maskrcnn.data import build_dataset  # noqa: E402
from maskrcnn.engine.checkpoint import load_model  # noqa: E402
from maskrcnn.engine.evaluate import evaluate_dataset  # noqa: E402
from maskrcnn.export import OnnxPredictor, OpenVinoPredictor, export_model  # noqa: E402
from maskrcnn.model.precision import cpu_has_bf16  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"  # one JSON file per benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint written by `maskrcnn train` (its val split is evaluated)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--work", default="/tmp/maskrcnn_runtime_accuracy", help="folder of the ONNX export")
    parser.add_argument("--threads", type=int, default=2, help="torch, ONNX Runtime and OpenVINO threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "runtime_accuracy.json",
                        help="the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    precisions = ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
    fp32 = load_model(args.checkpoint, overrides=[*args.set, "model.precision=fp32"])
    onnx_path = Path(args.work) / "model.onnx"
    export_model(fp32.model, onnx_path, class_names=[c["name"] for c in fp32.categories])
    candidates = {"eager fp32": fp32.model}
    if "bf16" in precisions:
        candidates["eager bf16"] = load_model(args.checkpoint, overrides=[*args.set, "model.precision=bf16"]).model
    candidates["onnxruntime fp32"] = PredictorModule(OnnxPredictor(onnx_path, threads=args.threads))
    try:
        for precision in precisions:
            candidates[f"openvino {precision}"] = PredictorModule(
                OpenVinoPredictor(onnx_path, precision=precision, threads=args.threads))
    except ImportError:
        print("openvino is not installed: its rows are left out", flush=True)

    cfg = fp32.config
    dataset = build_dataset(cfg.data, "val")
    out = {"checkpoint": str(args.checkpoint), "overrides": args.set, "num_images": len(dataset),
           "cpu": platform.processor() or platform.machine(), "threads": args.threads,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": {}}
    for name, model in candidates.items():
        start = time.perf_counter()
        result = evaluate_dataset(model, dataset, batch_size=1, device=torch.device("cpu"),
                                  iou_thresh=cfg.eval.iou_thresh)
        seconds = (time.perf_counter() - start) / len(dataset)
        metrics = result.metrics
        row = {"box_AP": metrics["bbox"]["AP"], "mask_AP": metrics["segm"]["AP"],
               "box_mAP50": metrics["voc"]["bbox"]["mAP"], "mask_mAP50": metrics["voc"]["segm"]["mAP"],
               "seconds_per_image": seconds}
        out["rows"][name] = row
        print(f"{name:18s} box AP {row['box_AP']:.4f}  mask AP {row['mask_AP']:.4f}  box mAP@0.5 "
              f"{row['box_mAP50']:.4f}  mask mAP@0.5 {row['mask_mAP50']:.4f}  {seconds:.2f} s/image", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

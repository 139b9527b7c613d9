"""Host-device synchronisation points of a training step and an inference call, ours against torchvision's.

On a GPU every op whose output shape or value the host must know (nonzero, boolean-mask indexing, `.item()`,
`.tolist()`, unique, bincount, NMS) makes the CPU wait until the GPU queue has drained, so the next kernels are
launched late. Those ops are the same whatever the device, so they can be counted on the CPU: every aten op
passes through a `TorchDispatchMode`, which records the ones that would wait on CUDA, with the line of the
model's code that called them.

    python benchmarks/sync_points.py                          # batch 2, 512x704, CPU
    python benchmarks/sync_points.py --batch 8 --where        # plus the calling lines

torchvision's `batched_nms` takes its per-group loop (a unique, then a nonzero and an NMS per group) above
1000 boxes on CPU and above 5000 on CUDA, so counts of calls with between 1000 and 5000 boxes differ by device.
"""

from __future__ import annotations

import argparse
import collections
import json
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.detection import maskrcnn_resnet50_fpn

from compare_torchvision import load_batch, train_step_fn
from maskrcnn.model import from_torchvision

# aten / torchvision ops that wait for the device on CUDA, and why
WAITING_OPS = {
    "aten.nonzero.default": "output size is data-dependent",
    "aten.masked_select.default": "output size is data-dependent",
    "aten._unique2.default": "output size is data-dependent",
    "aten.unique_consecutive.default": "output size is data-dependent",
    "aten.unique_dim.default": "output size is data-dependent",
    "aten.repeat_interleave.Tensor": "output size is data-dependent (without output_size)",
    "aten.bincount.default": "CUDA kernel reads the maximum on the host",
    "aten.item.default": "tensor -> Python number (.item(), int(), float())",
    "aten._local_scalar_dense.default": "tensor -> Python number (what .item() runs outside inference mode)",
    "aten.is_nonzero.default": "tensor -> Python bool (if tensor:)",
    "aten.equal.default": "returns a Python bool",
    "torchvision.nms.default": "CUDA kernel copies its suppression mask to the host",
}


class SyncCounter(TorchDispatchMode):
    """Counts the ops of `WAITING_OPS`, boolean-mask indexing (a nonzero inside) and `Tensor.tolist`."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.places: collections.Counter = collections.Counter()

    def record(self, name: str) -> None:
        self.counts[name] += 1
        frames = [f for f in traceback.extract_stack()[:-2] if "/maskrcnn/" in f.filename or "/torchvision/" in f.filename]
        if frames:
            frame = frames[-1]
            self.places[f"{name} at {Path(frame.filename).name}:{frame.lineno} ({frame.name})"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name == "aten.repeat_interleave.Tensor" and (kwargs or {}).get("output_size") is not None:
            pass  # the output size is given: nothing to read back
        elif name in WAITING_OPS:
            self.record(name)
        elif name.startswith(("aten.index.", "aten.index_put")) and _has_bool_index(args):
            self.record(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        counter, tolist = self, torch.Tensor.tolist

        def counted_tolist(tensor):
            counter.record("Tensor.tolist")
            return tolist(tensor)

        self._tolist, torch.Tensor.tolist = tolist, counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in indices)


def count(name: str, images: list[torch.Tensor], targets: list[dict], num_classes: int) -> dict:
    """Sync points of one training step and one inference call of one model (after one untimed step each)."""
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes)
    if name == "ours":
        model = from_torchvision(model)
    step = train_step_fn(model, images, targets, None, torch.device("cpu"))
    step()  # caches (anchors, fused backbone) are built outside the count
    result = {}
    with SyncCounter() as counter:
        step()
    result["train"] = counter
    model.eval()
    with torch.inference_mode():
        model(images)
        with SyncCounter() as counter:
            model(images)
    result["infer"] = counter
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=704)
    parser.add_argument("--num-classes", type=int, default=2, help="classes including background, as torchvision counts")
    parser.add_argument("--where", action="store_true", help="also list the calling line of every sync point")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/sync_points.json"))
    args = parser.parse_args()

    images, targets = load_batch(args.batch, torch.device("cpu"), args.height, args.width)
    results = {name: count(name, images, targets, args.num_classes) for name in ("torchvision", "ours")}
    print(f"host-device sync points per call, batch {args.batch}, {args.height}x{args.width}\n")
    print("| op | torchvision train | ours train | torchvision inference | ours inference |")
    print("| --- | --- | --- | --- | --- |")
    ops = sorted({op for result in results.values() for counter in result.values() for op in counter.counts})
    for op in [*ops, "total"]:
        cells = [sum(results[name][mode].counts.values()) if op == "total" else results[name][mode].counts[op]
                 for mode in ("train", "infer") for name in ("torchvision", "ours")]
        print(f"| {op} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    if args.where:
        for name, result in results.items():
            for mode, counter in result.items():
                print(f"\n{name} {mode}:")
                for place, number in sorted(counter.places.items()):
                    print(f"  {number:4d}  {place}")
    args.json.write_text(json.dumps({
        "batch": args.batch, "height": args.height, "width": args.width,
        "counts": {name: {mode: dict(counter.counts) for mode, counter in result.items()} for name, result in results.items()},
    }, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

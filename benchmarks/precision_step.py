"""fp32 against bf16 training steps of a preset's model on its own data: what `train.precision` buys per step.

Steps alternate between the two precisions (fp32, bf16, fp32, ...) on the same loader, so that a change of the
machine's load meanwhile slows both alike; the first 4 steps are not timed. With --cpu-time the figure is the
process's CPU time per step instead of the wall time: on a shared machine with one thread, the CPU time of a step
hardly depends on what else runs (the wall time does, several-fold).

    OMP_NUM_THREADS=1 python benchmarks/precision_step.py demo --threads 1 --steps 30 --cpu-time
    python benchmarks/precision_step.py pennfudan-lite --set data.root=../shared/data/PennFudanPed --threads 1 --cpu-time
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from maskrcnn.config import config_path, load_config
from maskrcnn.data import build_dataset, build_train_loader
from maskrcnn.engine.common import autocast, images_to_model, targets_to_device
from maskrcnn.engine.schedule import build_optimizer
from maskrcnn.model import build_model

UNTIMED_STEPS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="preset name or YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="steps in all, both precisions")
    parser.add_argument("--cpu-time", action="store_true", help="time the process's CPU time, not the wall time")
    args = parser.parse_args()
    cfg = load_config(config_path(args.config), args.set)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = build_model(cfg.model).train()
    loader = build_train_loader(build_dataset(cfg.data, "train"), batch_size=cfg.train.batch_size, num_workers=0,
                                aspect_ratio_grouping=True, seed=0, rank=0, world_size=1, start_iter=0)
    optimizer = build_optimizer(model, name=cfg.train.optimizer, lr=1e-5, momentum=0.9, weight_decay=0.0)
    clock = time.process_time if args.cpu_time else time.perf_counter
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for step in range(args.steps):
        precision = ("fp32", "bf16")[step % 2]
        images, targets = next(loader)
        images, targets = images_to_model(images, device), targets_to_device(targets, device)
        start = clock()
        with autocast(device, False, cpu_bf16=precision == "bf16"):
            losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(value.float() for value in losses.values()).backward()
        optimizer.step()
        if step >= UNTIMED_STEPS:
            times[precision].append(clock() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.config}, batch {cfg.train.batch_size}, {args.threads} thread(s), median "
          f"{'CPU' if args.cpu_time else 'wall'} seconds per step of {len(times['fp32'])} each: fp32 "
          f"{medians['fp32']:.3f}, bf16 {medians['bf16']:.3f}, bf16 / fp32 {medians['bf16'] / medians['fp32']:.2f}")


if __name__ == "__main__":
    main()

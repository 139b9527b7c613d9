"""A cross-check of generalisation for a Penn-Fudan checkpoint: AP on harder photos made from the 50 held-out ones,
beside AP on the held-out photos themselves.

Penn-Fudan has no second test set, so this builds one, seeded, from the held-out photos (the split of the checkpoint's
config: the last `data.num_val` of a seeded permutation), three variants of each photo:

- small: its pedestrians cut out through their masks, shrunk to 30-60 %, pasted at a random place on another street:
  the widest band of the next held-out photo that no pedestrian mask touches (48 px at least), mirrored side by side
  to that photo's width and resized to this photo's size;
- crop: a random window of 55 % of each side (zoomed in by the model's resize; pedestrians cut by the window keep what
  is left, those left with under 64 pixels are dropped);
- grey: the photo in greyscale.

The photos and a COCO instances.json (RLE masks) go to a temporary folder outside the repository (Penn-Fudan's licence
forbids reposting), removed afterwards unless --keep. Evaluation is `maskrcnn evaluate`, once on the held-out photos
and once per variant.

    python benchmarks/generalisation.py runs/pennfudan-lite/last.pt --root /path/to/PennFudanPed

The figures go to benchmarks/results/generalisation.json (--json elsewhere).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.config import config_from_dict
from maskrcnn.data import PennFudanDataset
from maskrcnn.data.common import masks_to_boxes
from maskrcnn.data.transforms import keep_visible_instances, resize
from maskrcnn.engine.checkpoint import load_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"  # one JSON file per benchmark

VARIANTS = ("small", "crop", "grey")
MIN_PIXELS = 64  # a pedestrian cut down to fewer pixels by a crop is no longer a fair target


def free_band(masks: torch.Tensor) -> slice:
    """The widest run of columns that no mask touches. masks: u8[N, H, W]."""
    free = (~masks.bool().any(0).any(0)).tolist()  # (N, H, W) -> (W,)
    best, start = (0, 0), None
    for column, is_free in enumerate([*free, False]):
        if is_free and start is None:
            start = column
        elif not is_free and start is not None:
            best = max(best, (column - start, start))
            start = None
    width, first = best
    return slice(first, first + width)


def street_background(image: torch.Tensor, masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor | None:
    """A pedestrian-free band of `image`, mirrored side by side to the image's width and resized to `size`; None
    when the band is under 48 px wide. image: u8[3, H, W] -> u8[3, size[0], size[1]]."""
    band = image[:, :, free_band(masks)]
    if band.shape[-1] < 48:
        return None
    width = image.shape[-1]
    tiles = [band if number % 2 == 0 else band.flip(-1) for number in range(-(-width // band.shape[-1]))]
    street = torch.cat(tiles, dim=-1)[None, :, :, :width].float()  # (3, H, W) -> (1, 3, H, W)
    street = torch.nn.functional.interpolate(street, size=size, mode="bilinear", antialias=True, align_corners=False)
    return street[0].round().clamp(0, 255).to(torch.uint8)


def small_people(image: torch.Tensor, target: dict, background: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """The pedestrians of (image, target) shrunk by a random 0.3-0.6 and pasted onto `background` (same size)."""
    height, width = background.shape[-2:]
    scale = 0.3 + 0.3 * torch.rand((), generator=generator).item()
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[2] * scale)))
    small, small_target = resize(image, target, size)
    small_target = keep_visible_instances(small_target, MIN_PIXELS)
    x1, y1, x2, y2 = small_target["boxes"].amin(0)[:2].tolist() + small_target["boxes"].amax(0)[2:].tolist()
    x1, y1, x2, y2 = int(x1), int(y1), int(x2), int(y2)
    # a random place on the background for the union box of the shrunk pedestrians
    top = int(torch.randint(0, height - (y2 - y1) + 1, (), generator=generator))
    left = int(torch.randint(0, width - (x2 - x1) + 1, (), generator=generator))
    masks = small_target["masks"].new_zeros((len(small_target["masks"]), height, width))
    masks[:, top:top + y2 - y1, left:left + x2 - x1] = small_target["masks"][:, y1:y2, x1:x2]
    pixels = background.clone()
    pixels[:, top:top + y2 - y1, left:left + x2 - x1] = small[:, y1:y2, x1:x2]
    covered = masks.bool().any(0)  # (N, H, W) -> (H, W)
    return torch.where(covered, pixels, background), keep_visible_instances({**small_target, "masks": masks}, 1)


def crop(image: torch.Tensor, target: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict] | None:
    """A random window of 55 % of each side; None when no pedestrian keeps `MIN_PIXELS` in it."""
    height, width = image.shape[-2:]
    crop_h, crop_w = round(height * 0.55), round(width * 0.55)
    for _ in range(20):
        top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
        left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
        window = {**target, "masks": target["masks"][:, top:top + crop_h, left:left + crop_w]}
        window = keep_visible_instances(window, MIN_PIXELS)
        if len(window["masks"]):
            return image[:, top:top + crop_h, left:left + crop_w], window
    return None


def grey(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """ITU-R 601 luma in all three channels."""
    weights = torch.tensor([0.299, 0.587, 0.114])[:, None, None]
    luma = (image.float() * weights).sum(0).round().clamp(0, 255).to(torch.uint8)  # (3, H, W) -> (H, W)
    return luma.expand(3, -1, -1).clone(), target


def write_coco(samples: list[tuple[torch.Tensor, dict]], folder: Path) -> Path:
    """Writes the photos as PNGs into folder/images and their pedestrians into folder/instances.json."""
    (folder / "images").mkdir(parents=True)
    images, annotations = [], []
    for image_id, (image, target) in enumerate(samples, start=1):
        name = f"{image_id:04d}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / "images" / name)  # (3, H, W) -> (H, W, 3)
        images.append({"id": image_id, "file_name": name, "height": image.shape[1], "width": image.shape[2]})
        for mask, box in zip(target["masks"], masks_to_boxes(target["masks"])):
            rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
            x1, y1, x2, y2 = box.tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(mask.sum())})
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "person"}]}))
    return path


def hard_sets(root: str, num_val: int, split_seed: int, seed: int) -> dict[str, list[tuple[torch.Tensor, dict]]]:
    """The three variants of every held-out photo."""
    held_out = PennFudanDataset(root=root, split="val", num_val=num_val, split_seed=split_seed)
    photos = [held_out[i] for i in range(len(held_out))]
    generator = torch.Generator().manual_seed(seed)
    sets: dict[str, list] = {name: [] for name in VARIANTS}
    for number, (image, target) in enumerate(photos):
        backgrounds = (street_background(other, other_target["masks"], tuple(image.shape[1:]))
                       for other, other_target in photos[number + 1:] + photos[:number])
        background = next((street for street in backgrounds if street is not None), None)
        if background is not None:
            sets["small"].append(small_people(image, target, background, generator))
        cropped = crop(image, target, generator)
        if cropped is not None:
            sets["crop"].append(cropped)
        sets["grey"].append(grey(image, target))
    return sets


def evaluate(checkpoint: Path, out: Path, settings: list[str]) -> dict:
    """`maskrcnn evaluate` of `checkpoint` with `settings`; returns its metrics.json."""
    command = [sys.executable, "-m", "maskrcnn", "evaluate", str(checkpoint), "--out", str(out)]
    for setting in settings:
        command += ["--set", setting]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint trained on Penn-Fudan (e.g. runs/.../last.pt)")
    parser.add_argument("--root", required=True, help="the PennFudanPed folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the harder photos")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    parser.add_argument("--json", type=Path, default=RESULTS / "generalisation.json",
                        help="the figures as JSON")
    args = parser.parse_args()

    data = config_from_dict(load_checkpoint(args.checkpoint)["config"]).data
    folder = Path(tempfile.mkdtemp(prefix="pennfudan-hard-"))
    try:
        results = {"held-out": evaluate(args.checkpoint, folder / "eval-held-out", [f"data.root={args.root}"])}
        for name, samples in hard_sets(args.root, data.num_val, data.split_seed, args.seed).items():
            annotations = write_coco(samples, folder / name)
            results[name] = evaluate(args.checkpoint, folder / f"eval-{name}", [
                "data.format=coco", f"data.val_images={folder / name / 'images'}",
                f"data.val_annotations={annotations}"])
            results[name]["num_images"] = len(samples)
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder)
    print(f"{args.checkpoint}\n| photos | images | box AP | box AP50 | mask AP | mask AP50 |\n|---|---|---|---|---|---|")
    for name, metrics in results.items():
        print(f"| {name} | {metrics.get('num_images', data.num_val)} | {metrics['bbox']['AP']:.3f} | "
              f"{metrics['bbox']['AP50']:.3f} | {metrics['segm']['AP']:.3f} | {metrics['segm']['AP50']:.3f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), **results}, indent=1) + "\n")


if __name__ == "__main__":
    main()

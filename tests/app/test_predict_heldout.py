"""Issue 32's held-out style checks, through the command a user runs: a short video made from photos gives an
overlay video with every frame and per-frame results, the same as predicting each decoded frame; a 4 x 4 mosaic
of photos predicted with --tile gives every object once, in the mosaic's coordinates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.app import predict
from maskrcnn.app.predictor import Predictor
from maskrcnn.app.results import BoxedDetections
from maskrcnn.cli import main

FRAME_SIZE = (96, 128)  # (H, W) of the video's frames: small, so that the tiny model runs fast


def photos(count: int, size: tuple[int, int]) -> list[np.ndarray]:
    """`count` Penn-Fudan photos resized to `size` (H, W) as uint8 [H, W, 3]; skips without the data."""
    root = os.environ.get("MASKRCNN_PENNFUDAN")
    files = sorted((Path(root) / "PNGImages").glob("*.png"))[:count] if root else []
    if len(files) < count:
        pytest.skip("Penn-Fudan photos not found (set MASKRCNN_PENNFUDAN to the PennFudanPed folder)")
    return [np.asarray(Image.open(file).convert("RGB").resize(size[::-1], Image.BILINEAR)) for file in files]


def test_a_video_made_from_photos_gives_every_frame_and_its_results(tiny_run, tmp_path):
    """6 photos as an H.264 video at 3 frames/s: the overlay video has 6 frames of the source's size and rate;
    images.json has frames 0..5 at k / 3 s; predictions.json holds, per frame, exactly what the same checkpoint
    predicts on that decoded frame (boxes, scores, RLE), each entry with its frame index."""
    av = pytest.importorskip("av")
    with av.open(str(tmp_path / "clip.mp4"), mode="w") as container:
        stream = container.add_stream("libx264", rate=3)
        stream.width, stream.height, stream.pix_fmt = FRAME_SIZE[1], FRAME_SIZE[0], "yuv420p"
        for photo in photos(6, FRAME_SIZE):
            for packet in stream.encode(av.VideoFrame.from_ndarray(photo, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    overrides = ["model.box_head.score_thresh=0"]
    out = tmp_path / "pred"
    assert main(["predict", str(tiny_run / "last.pt"), str(tmp_path / "clip.mp4"), "--out", str(out),
                 "--score-thresh", "0", "--batch-size", "4", *(a for o in overrides for a in ("--set", o))]) == 0

    with av.open(str(out / "clip.mp4_pred.mp4")) as container:
        video = container.streams.video[0]
        assert (video.average_rate, video.height, video.width) == (3, *FRAME_SIZE)
        assert sum(1 for _ in container.decode(video)) == 6
    records = json.loads((out / "images.json").read_text())
    assert [(r["frame"], r["timestamp"]) for r in records] == [(k, pytest.approx(k / 3)) for k in range(6)]
    predictions = json.loads((out / "predictions.json").read_text())
    assert sum(r["detections"] for r in records) == len(predictions) > 0

    with av.open(str(tmp_path / "clip.mp4")) as container:  # the frames as the command decoded them
        decoded = [torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1) for f in container.decode(video=0)]
    expected = Predictor(tiny_run / "last.pt", score_thresh=0.0, batch_size=4, overrides=overrides).predict_batch(decoded)
    for record, result in zip(records, expected):
        got = [p for p in predictions if p["frame"] == record["frame"]]
        assert all(p["image_id"] == record["image_id"] for p in got)
        want = result.to_coco(record["image_id"])
        assert [p["segmentation"] for p in got] == [w["segmentation"] for w in want]
        np.testing.assert_allclose([p["bbox"] for p in got], [w["bbox"] for w in want], atol=1e-4)
        np.testing.assert_allclose([p["score"] for p in got], [w["score"] for w in want], atol=1e-6)


class MarkerFinder:
    """A stand-in model for the mosaic: in each image it is given, every marker (pixels of blue 255 and green 0;
    the photos have blue <= 254) of one red value is an object: its box (the pixels' bounds, cut where the image
    or tile ends), a full mask, score = red / 255."""

    class_names = ("marker",)
    categories = ({"id": 1, "name": "marker"},)

    def __call__(self, images):
        found = []
        for image in images:
            red = torch.where((image[2] == 255) & (image[1] == 0), image[0], torch.zeros_like(image[0]))
            values = [v for v in red.unique().tolist() if v > 0]
            boxes = []
            for value in values:
                ys, xs = torch.nonzero(red == value, as_tuple=True)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            found.append(BoxedDetections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                         torch.ones(len(values), dtype=torch.int64),
                                         torch.tensor(values, dtype=torch.float32) / 255, torch.ones(len(values), 7, 7)))
        return found


# markers of the mosaic (red value: x0, y0, x1, y1); tiles of 64 at overlap 0.25 start at 0, 48, 96, 144, 192
MARKERS = {
    40: (10, 10, 20, 20),  # inside one tile
    80: (58, 100, 74, 110),  # across the border of two photos at x 64 and of the tiles at 64 and 96
    120: (120, 120, 136, 136),  # on the corner of four photos (x, y 128), in up to 9 tiles
    160: (30, 200, 230, 206),  # a bar across the mosaic: in pieces in 5 tiles of a row, whole in no tile
    200: (240, 240, 256, 256),  # at the mosaic's bottom-right corner
}


def test_a_4x4_mosaic_in_tiles_gives_each_object_once_in_full_coordinates(tmp_path, monkeypatch):
    """A 256 x 256 mosaic of 16 photos of 64 x 64 with MARKERS painted over them, `maskrcnn predict --tile 64
    --overlap 0.25`: 25 tiles and the whole image; every marker comes out once, with its box [x, y, w, h] and its
    mask in the mosaic's pixels, whatever the tiles it was cut into."""
    root = os.environ.get("MASKRCNN_PENNFUDAN")
    tiles = photos(16, (64, 64)) if root else [  # photos, else noise: the stand-in model only sees the markers
        np.random.default_rng(k).integers(0, 255, (64, 64, 3), dtype=np.uint8) for k in range(16)]
    mosaic = np.concatenate([np.concatenate(tiles[4 * row:4 * row + 4], axis=1) for row in range(4)], axis=0)
    mosaic[..., 2] = np.minimum(mosaic[..., 2], 254)
    for value, (x0, y0, x1, y1) in MARKERS.items():
        mosaic[y0:y1, x0:x1] = (value, 0, 255)
    Image.fromarray(mosaic).save(tmp_path / "mosaic.png")
    monkeypatch.setattr(predict, "load_detector", lambda *args, **kwargs: MarkerFinder())
    out = tmp_path / "pred"
    assert main(["predict", "stand-in.pt", str(tmp_path / "mosaic.png"), "--out", str(out), "--score-thresh", "0",
                 "--tile", "64", "--overlap", "0.25", "--batch-size", "8"]) == 0
    predictions = json.loads((out / "predictions.json").read_text())
    assert [p["score"] for p in predictions] == pytest.approx([v / 255 for v in sorted(MARKERS, reverse=True)])
    for p in predictions:
        x0, y0, x1, y1 = MARKERS[round(p["score"] * 255)]
        assert p["bbox"] == [x0, y0, x1 - x0, y1 - y0]
        expected = np.zeros((256, 256), dtype=np.uint8)
        expected[y0:y1, x0:x1] = 1
        assert (mask_utils.decode({**p["segmentation"], "counts": p["segmentation"]["counts"].encode()})
                == expected).all()
    assert json.loads((out / "images.json").read_text())[0]["detections"] == len(MARKERS)

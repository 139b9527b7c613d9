"""Prediction on image files runs evaluation's model: the same detections for the same image; the pipeline keeps
input order, writes its json files when stopped, and records a bad input next to good ones that are predicted."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.app import sources
from maskrcnn.app.pipeline import BatchPredictor
from maskrcnn.app.predict import (
    PredictionWriter,
    PredictOptions,
    output_names,
    predict_to_folder,
    run_prediction,
)
from maskrcnn.app.results import BoxedDetections
from maskrcnn.app.sources import collect_inputs
from maskrcnn.data import build_dataset
from maskrcnn.engine.checkpoint import load_model
from maskrcnn.engine.evaluate import evaluate_dataset
from maskrcnn.errors import UserError


def test_a_checkpoint_predicts_on_files_what_it_scores_in_evaluation(tiny_run, tmp_path):
    """The validation images written as PNG files (lossless) and predicted in batches of 3 with masks encoded
    box by box give the detections that evaluation found for them from its dense paste: boxes, scores, labels and
    RLE masks alike, in input order."""
    loaded = load_model(tiny_run / "last.pt", overrides=["model.box_head.score_thresh=0.0"])
    dataset = build_dataset(loaded.config.data, "val")
    evaluation = evaluate_dataset(loaded.model, dataset, batch_size=2, device=loaded.device)
    images = tmp_path / "images"
    images.mkdir()
    for index in range(len(dataset)):
        image, _ = dataset[index]
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(images / f"val{index}.png")  # (3, H, W) -> (H, W, 3)
    run_prediction(tiny_run / "last.pt", [str(images)], tmp_path / "pred", overrides=["model.box_head.score_thresh=0"],
                   options=PredictOptions(score_thresh=0.0, batch_size=3, progress=False))
    predicted = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    ids = {f"val{index}.png": int(dataset[index][1]["image_id"]) for index in range(len(dataset))}
    assert len(predicted) == len(evaluation.detections) > 0
    for ours, theirs in zip(sorted(predicted, key=lambda d: (ids[d["file_name"].split("/")[-1]], -d["score"])),
                            sorted(evaluation.detections, key=lambda d: (d["image_id"], -d["score"]))):
        assert (ids[ours["file_name"].split("/")[-1]], ours["category_id"], ours["segmentation"]) == \
            (theirs["image_id"], theirs["category_id"], theirs["segmentation"])
        np.testing.assert_allclose(ours["bbox"], theirs["bbox"], atol=1e-3)
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-5)
    records = json.loads((tmp_path / "pred" / "images.json").read_text())
    assert [r["file_name"] for r in records] == [str(images / f"val{i}.png") for i in range(len(dataset))]


def test_inputs_and_overlay_names(tmp_path, monkeypatch):
    monkeypatch.setattr(sources.video, "require_pyav", lambda path: None)  # the names, with or without PyAV
    for name in ("b.png", "a.jpg", "notes.txt", "c.tif", "d.webp", "e.gif", "clip.mp4"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jpg").write_bytes(b"")
    found = collect_inputs([tmp_path, tmp_path / "b.png", tmp_path / "sub" / "a.jpg"])
    assert [(item.path[len(str(tmp_path)) + 1:], item.kind) for item in found] == [
        ("a.jpg", "image"), ("b.png", "image"), ("c.tif", "image"), ("clip.mp4", "video"), ("d.webp", "image"),
        ("e.gif", "image"), ("sub/a.jpg", "image")]  # b.png once; notes.txt skipped
    names = output_names(found)
    assert [str(names[item.path]) for item in found] == ["a.jpg_pred.png", "b.png_pred.png", "c.tif_pred.png",
                                                        "clip.mp4_pred.mp4", "d.webp_pred.png", "e.gif_pred.png",
                                                        "sub/a.jpg_pred.png"]
    assert [item.path for item in collect_inputs([tmp_path], recursive=True)][-1] == str(tmp_path / "sub" / "a.jpg")
    assert [item.path for item in collect_inputs([str(tmp_path / "**" / "a.*")])] == [
        str(tmp_path / "a.jpg"), str(tmp_path / "sub" / "a.jpg")]
    with pytest.raises(UserError, match="image, video or folder not found: .*missing.png"):
        collect_inputs([tmp_path / "missing.png"])
    with pytest.raises(UserError, match=r"\*.bmp: no image or video file matches"):
        collect_inputs([str(tmp_path / "*.bmp")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no image or video files"):
        collect_inputs([tmp_path / "empty"])


def test_a_video_without_pyav_is_one_line_before_anything_is_read(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "clip.mp4").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    needs_pyav = r"clip.mp4: reading and writing video needs PyAV: pip install maskrcnn\[video\]"
    with pytest.raises(UserError, match=needs_pyav):
        collect_inputs([tmp_path])
    assert len(collect_inputs([tmp_path / "a.png"])) == 1  # images alone do not need it


def test_pipes_are_never_read(tmp_path, caplog):
    """A named pipe opened for reading blocks until a writer comes: named, it is refused in one line; in a
    folder it is skipped and listed with the other files that are not images."""
    import os

    Image.new("RGB", (8, 6)).save(tmp_path / "good.png")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="pipe.png: a named pipe, not a file"):
        collect_inputs([tmp_path / "pipe.png"])
    with pytest.raises(UserError, match="/dev/null: a character device, not a file"):
        collect_inputs(["/dev/null"])
    assert [item.path for item in collect_inputs([tmp_path])] == [str(tmp_path / "good.png")]
    assert "skipped 2 file(s) that are not images or videos: " \
        f"{tmp_path / 'notes.txt'} (not an image or video type), {tmp_path / 'pipe.png'} (a named pipe)" in caplog.text


class FakeDetector:
    """One detection per image, box (2, 1)-(5, 3) with a full mask; raises KeyboardInterrupt at call `stop_at`."""

    class_names = ("thing",)

    def __init__(self, stop_at: int | None = None) -> None:
        self.calls, self.stop_at = 0, stop_at

    def __call__(self, images):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return [BoxedDetections(torch.tensor([[2.0, 1.0, 5.0, 3.0]]), torch.tensor([1]), torch.tensor([0.9]),
                                torch.ones(1, 4, 4)) for _ in images]


def test_stopped_run_keeps_the_results_of_the_images_done_and_bad_images_are_recorded(tmp_path):
    for name in ("a.png", "c.png", "d.png"):
        Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "b.png").write_bytes(b"not a png")
    inputs = collect_inputs([tmp_path])
    out = tmp_path / "pred"
    writer = PredictionWriter(out, [{"id": 7, "name": "thing"}], output_names(inputs))
    with pytest.raises(KeyboardInterrupt):  # batches of 2 readable images: [a, c] done, [d] stopped
        predict_to_folder(inputs, BatchPredictor(FakeDetector(stop_at=2), batch_size=2), writer, progress=False)
    predictions = json.loads((out / "predictions.json").read_text())
    assert [(p["image_id"], p["category_id"], p["bbox"]) for p in predictions] == [
        (1, 7, [2.0, 1.0, 3.0, 2.0]), (3, 7, [2.0, 1.0, 3.0, 2.0])]
    # mask rows 1-2, columns 2-4 of a 6 x 8 image, column-major RLE: 13 zeros, then (2 ones, 4 zeros) x 2, 2 ones
    assert predictions[0]["segmentation"]["counts"] == mask_rle_of_rect(6, 8, 1, 3, 2, 5)
    records = json.loads((out / "images.json").read_text())
    assert [r["file_name"].split("/")[-1] for r in records] == ["a.png", "b.png", "c.png"]
    assert "cannot decode image" in records[1]["error"] and records[2]["overlay"] == "c.png_pred.png"
    assert (out / "a.png_pred.png").exists() and not (out / "d.png_pred.png").exists()


def mask_rle_of_rect(height, width, y0, y1, x0, x1) -> str:
    from pycocotools import mask as mask_utils

    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask_utils.encode(np.asfortranarray(mask))["counts"].decode()


def test_polygons_mask_pngs_and_no_overlays(tiny_run, tmp_path):
    """--format polygons gives COCO polygons of the same masks (their pixels within the outline's half pixel),
    --save-masks one PNG of detection numbers, --no-overlays no picture."""
    from pycocotools import mask as mask_utils

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    common = {"overrides": ["model.box_head.score_thresh=0"]}
    run_prediction(tiny_run / "last.pt", [str(tmp_path / "x.png")], tmp_path / "rle", **common,
                   options=PredictOptions(score_thresh=0.0, save_masks=True, progress=False))
    run_prediction(tiny_run / "last.pt", [str(tmp_path / "x.png")], tmp_path / "poly", **common,
                   options=PredictOptions(score_thresh=0.0, format="polygons", overlays=False, progress=False))
    rle = json.loads((tmp_path / "rle" / "predictions.json").read_text())
    poly = json.loads((tmp_path / "poly" / "predictions.json").read_text())
    assert len(rle) == len(poly) > 0 and not (tmp_path / "poly" / "x.png_pred.png").exists()
    ids = np.asarray(Image.open(tmp_path / "rle" / "x.png_masks.png"))
    for k, (r, p) in enumerate(zip(rle, poly), start=1):
        assert isinstance(p["segmentation"], list) and p["bbox"] == r["bbox"]
        dense = mask_utils.decode(r["segmentation"])
        assert ((ids == k) <= dense.astype(bool)).all()  # detection k's pixels, less those a better one covers
        if dense.sum() >= 20 and p["segmentation"]:
            outline = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(p["segmentation"], 64, 64)))
            assert (outline & dense).sum() / (outline | dense).sum() > 0.6


def test_an_image_too_thin_for_the_model_is_recorded_and_the_others_predicted(tiny_run, tmp_path, caplog):
    """2 x 300 pixels resize to 0 x 64 at the tiny model's 64-pixel max_size: skipped with its reason, the
    images before and after it predicted."""
    for name, size in (("a.png", (64, 64)), ("b.png", (2, 300)), ("c.png", (40, 50))):
        Image.fromarray(np.full((*size, 3), 120, dtype=np.uint8)).save(tmp_path / name)
    run_prediction(tiny_run / "last.pt", [str(tmp_path)], tmp_path / "pred",
                   options=PredictOptions(score_thresh=0.0, batch_size=3, progress=False))
    records = json.loads((tmp_path / "pred" / "images.json").read_text())
    assert ["error" in r for r in records] == [False, True, False]
    assert records[1]["error"] == f"{tmp_path / 'b.png'}: 300 x 2 pixels resizes to 64 x 0 for the model " \
                                  "(model.transform min_size / max_size): too thin to predict; crop it or use --tile"
    assert f"skipped {tmp_path / 'b.png'}: 300 x 2 pixels" in caplog.text


def test_a_folder_of_tiff_webp_and_gif_is_predicted(tmp_path):
    """Every type Pillow reads is an image of a folder (GIF: its first frame); each gets its overlay."""
    frames = [Image.fromarray(np.full((6, 8, 3), value, dtype=np.uint8)) for value in (30, 200)]
    frames[0].save(tmp_path / "a.tif")
    frames[0].save(tmp_path / "b.webp", lossless=True)
    frames[0].save(tmp_path / "c.gif", save_all=True, append_images=frames[1:])
    inputs = collect_inputs([tmp_path])
    writer = PredictionWriter(tmp_path / "pred", [{"id": 1, "name": "thing"}], output_names(inputs))
    records = predict_to_folder(inputs, BatchPredictor(FakeDetector()), writer, progress=False)
    assert [(r["file_name"].split("/")[-1], r["detections"]) for r in records] == [
        ("a.tif", 1), ("b.webp", 1), ("c.gif", 1)]
    overlay = np.asarray(Image.open(tmp_path / "pred" / "c.gif_pred.png"))
    assert overlay[0, 0].tolist() == [30, 30, 30]  # the first frame, outside the detection's box


def test_an_image_above_the_pixel_limit_asks_for_tiles(tmp_path, monkeypatch):
    """Over the pixels predicted in one piece (here lowered to 1000), an image is refused from its header with
    the advice to use --tile; in tiles it is read."""
    from maskrcnn.app import sources

    monkeypatch.setattr(sources, "UNTILED_MAX_PIXELS", 1000)
    Image.new("RGB", (50, 40)).save(tmp_path / "big.png")
    (whole,) = sources.read_frames([sources.Input(str(tmp_path / "big.png"), "image")])
    assert whole.image is None and whole.error == (f"{tmp_path / 'big.png'}: 50 x 40 pixels is more than the 1000 "
                                                   "predicted in one piece; predict it in tiles: --tile 1024 "
                                                   "--overlap 0.2")
    (tiled,) = sources.read_frames([sources.Input(str(tmp_path / "big.png"), "image")], tiled=True)
    assert tiled.error is None and tuple(tiled.image.shape) == (3, 40, 50)

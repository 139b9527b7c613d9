"""Prediction on image files runs evaluation's inference step: the same detections for the same image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from maskrcnn.data import build_dataset
from maskrcnn.engine.checkpoint import load_model
from maskrcnn.engine.evaluate import evaluate_dataset
from maskrcnn.app.predict import checkpoint_detector, image_paths, overlay_names, predict_images
from maskrcnn.errors import UserError


def test_a_checkpoint_predicts_on_files_what_it_scores_in_evaluation(tiny_run, tmp_path):
    """The validation images written as PNG files (lossless) and predicted one by one give the detections that
    evaluation found for them in batches: boxes, scores, labels and masks alike."""
    loaded = load_model(tiny_run / "last.pt", overrides=["model.box_head.score_thresh=0.0"])
    dataset = build_dataset(loaded.config.data, "val")
    evaluation = evaluate_dataset(loaded.model, dataset, batch_size=2, device=loaded.device)
    paths = []
    for index in range(len(dataset)):
        image, _ = dataset[index]
        paths.append(tmp_path / f"val{index}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])  # (3, H, W) -> (H, W, 3)
    ids = {path: int(dataset[index][1]["image_id"]) for index, path in enumerate(paths)}
    categories = [{"id": k, "name": f"class {k}"} for k in (1, 2)]
    done = predict_images(paths, checkpoint_detector(loaded), categories, ids, tmp_path / "pred", score_thresh=0.0)

    predicted = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert done.skipped == 0 and len(predicted) == len(evaluation.detections) > 0
    for ours, theirs in zip(sorted(predicted, key=lambda d: (d["image_id"], -d["score"])),
                            sorted(evaluation.detections, key=lambda d: (d["image_id"], -d["score"]))):
        assert (ours["image_id"], ours["category_id"], ours["segmentation"]) == \
            (theirs["image_id"], theirs["category_id"], theirs["segmentation"])
        np.testing.assert_allclose(ours["bbox"], theirs["bbox"], atol=1e-3)
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-5)


def test_image_paths_and_overlay_names(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jpg").write_bytes(b"")
    paths = image_paths([tmp_path, tmp_path / "b.png", tmp_path / "sub" / "a.jpg"])
    assert paths == [tmp_path / "a.jpg", tmp_path / "b.png", tmp_path / "sub" / "a.jpg"]  # b.png once
    assert [str(p) for p in overlay_names(paths)] == ["a.jpg_pred.png", "b.png_pred.png", "sub/a.jpg_pred.png"]
    with pytest.raises(UserError, match="image or folder not found: .*missing.png"):
        image_paths([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no image files"):
        image_paths([tmp_path / "empty"])

"""Evaluation: the per-class AP@0.5 (original metric) worked by hand, COCO AP 1.0 for perfect predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from maskrcnn.engine.coco_results import build_coco_ground_truth, targets_to_coco_annotations
from maskrcnn.engine.evaluate import evaluate, evaluate_dataset
from maskrcnn.engine.metrics import match_image, voc_average_precision

H, W = 40, 48


def rect_target(boxes: list[list[int]], labels: list[int], image_id: int) -> dict:
    """Target with filled-rectangle masks, so box IoU and mask IoU agree."""
    masks = torch.zeros(len(boxes), H, W, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        masks[i, y1:y2, x1:x2] = 1
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "masks": masks, "image_id": image_id}


def as_output(target: dict, scores: list[float]) -> dict:
    return {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.tensor(scores),
            "masks": target["masks"].float()[:, None]}  # (N, H, W) -> (N, 1, H, W)


class Replay(torch.nn.Module):
    """Returns prepared outputs, one list per call, in order (a stand-in for a trained model)."""

    def __init__(self, outputs_per_call: list[list[dict]]):
        super().__init__()
        self.outputs_per_call = list(outputs_per_call)

    def forward(self, images):
        assert all(image.dtype == torch.float32 and image.max() <= 1.0 for image in images)
        return self.outputs_per_call.pop(0)


def image() -> torch.Tensor:
    return torch.full((3, H, W), 200, dtype=torch.uint8)


def test_voc_ap_hand_worked():
    # 3 ground-truth objects; detections by descending score are TP, FP, TP, FP, TP.
    # precision 1/1, 1/2, 2/3, 2/4, 3/5 at recall 1/3, 1/3, 2/3, 2/3, 3/3.
    # Envelope (best precision at recall >= r): 1 at 1/3, 2/3 at 2/3, 3/5 at 1.
    # AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5 = (15 + 10 + 9) / 45 = 34/45 = 0.7556.
    scores = np.array([0.5, 0.9, 0.6, 0.7, 0.8])  # given out of order: the function sorts
    is_tp = np.array([True, True, False, True, False])
    ap, precision, recall = voc_average_precision(scores, is_tp, num_gt=3)
    assert ap == pytest.approx(34 / 45)
    np.testing.assert_allclose(precision, [1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])
    np.testing.assert_allclose(recall, [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])


def test_voc_ap_no_detection_and_all_wrong():
    assert voc_average_precision(np.zeros(0), np.zeros(0, dtype=bool), num_gt=2)[0] == 0.0
    assert voc_average_precision(np.array([0.9, 0.8]), np.array([False, False]), num_gt=2)[0] == 0.0


def test_match_image_duplicates_and_crowd():
    # Detections in score order; GT 0 normal, GT 1 crowd.
    ious = np.array([
        [0.9, 0.0],  # takes GT 0: TP
        [0.8, 0.1],  # best is GT 0, already taken: FP (VOC does not fall back to the second best)
        [0.2, 0.7],  # matches the crowd region: ignored
        [0.3, 0.4],  # below 0.5 everywhere: FP
    ])
    is_tp, ignored = match_image(ious, np.array([False, True]), 0.5)
    assert is_tp.tolist() == [True, False, False, False]
    assert ignored.tolist() == [False, False, True, False]


def test_match_image_without_ground_truth():
    is_tp, ignored = match_image(np.zeros((3, 0)), np.zeros(0, dtype=bool), 0.5)
    assert not is_tp.any() and not ignored.any()


def test_perfect_predictions_give_ap_one(tmp_path, caplog):
    targets = [
        rect_target([[2, 3, 20, 30], [25, 5, 45, 25]], [1, 2], image_id=11),
        rect_target([[0, 0, 30, 36]], [1], image_id=12),
        rect_target([[10, 10, 40, 38], [1, 1, 9, 9]], [2, 1], image_id=13),
    ]
    batches = [([image(), image()], targets[:2]), ([image()], targets[2:])]
    model = Replay([[as_output(t, [1.0] * len(t["labels"])) for t in targets[:2]],
                    [as_output(targets[2], [0.9, 0.8])]])
    with caplog.at_level("INFO", logger="maskrcnn"):
        result = evaluate(model, batches, class_names=["a", "b"], device=torch.device("cpu"), out_dir=tmp_path)
    assert any(m.startswith("evaluate: 3 images in") for m in caplog.messages)  # progress, to the maskrcnn logger
    assert ("evaluate: scoring 5 detections on 3 images (COCOeval, per-class AP, error analysis, mask ceiling)"
            in caplog.messages)
    for kind in ("bbox", "segm"):
        assert result.metrics[kind]["AP"] == pytest.approx(1.0)
        assert result.metrics[kind]["AP50"] == pytest.approx(1.0)
        assert result.metrics["voc"][kind]["mAP"] == pytest.approx(1.0)
        assert result.metrics["voc"][kind]["per_class"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    # boxes equal to the objects' boxes hold the whole objects: the ground truth in them scores AP 1 too
    assert result.metrics["mask_ceiling"]["GT in box"]["AP"] == pytest.approx(1.0)
    assert result.metrics["num_images"] == 3 and result.metrics["num_detections"] == 5
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["segm"]["AP"] == pytest.approx(1.0)
    detections = json.loads((tmp_path / "detections.json").read_text())
    assert {d["image_id"] for d in detections} == {11, 12, 13}
    assert detections[0]["bbox"] == [2.0, 3.0, 18.0, 27.0]  # xyxy -> xywh
    assert set(json.loads((tmp_path / "pr_curves.json").read_text())["segm"]) == {"a", "b"}


def test_hand_worked_pr_through_evaluate():
    # The 34/45 example from detections: 3 GT of class 1; by score: exact GT0 (TP), duplicate of GT0 (FP),
    # exact GT1 (TP), empty area (FP), exact GT2 (TP). Boxes and rectangle masks give the same matches.
    gt = [[0, 0, 10, 10], [20, 0, 30, 10], [0, 20, 10, 30]]
    target = rect_target(gt, [1, 1, 1], image_id=1)
    dets = rect_target([gt[0], [1, 0, 11, 10], gt[1], [35, 25, 45, 35], gt[2]], [1] * 5, image_id=1)
    model = Replay([[as_output(dets, [0.9, 0.8, 0.7, 0.6, 0.5])]])
    result = evaluate(model, [([image()], [target])], class_names=["thing"], device=torch.device("cpu"))
    for kind in ("bbox", "segm"):
        assert result.metrics["voc"][kind]["mAP"] == pytest.approx(34 / 45)
        np.testing.assert_allclose(result.pr_curves[kind]["thing"]["precision"], [1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])


def test_given_ground_truth_category_ids_missing_class_and_max_images():
    # Ground truth with COCO category ids 7 and 9 (labels 1 and 2); class 2 has no object: AP None, not in mAP.
    targets = [rect_target([[2, 2, 20, 20]], [1], image_id=5), rect_target([[4, 4, 30, 30]], [1], image_id=6)]
    annotations = []
    for t in targets:
        annotations += [dict(a, category_id=7) for a in targets_to_coco_annotations(t, t["image_id"], len(annotations) + 1)]
    images = [{"id": 5, "height": H, "width": W}, {"id": 6, "height": H, "width": W}]
    coco = build_coco_ground_truth(images, annotations, ["x"])
    coco.dataset["categories"] = [{"id": 7, "name": "x"}, {"id": 9, "name": "y"}]
    coco.createIndex()
    model = Replay([[as_output(targets[0], [0.9])]])
    result = evaluate(model, [([image()], targets[:1]), ([image()], targets[1:])], class_names=["x", "y"],
                      device=torch.device("cpu"), coco_gt=coco, label_to_category_id={1: 7, 2: 9}, max_images=1)
    voc = result.metrics["voc"]["segm"]
    assert voc["per_class"] == {"x": pytest.approx(1.0), "y": None}
    assert voc["mAP"] == pytest.approx(1.0)
    assert result.metrics["num_images"] == 1  # image 6 was never run (its unmatched GT would lower the AP)


def test_no_detections_score_zero():
    target = rect_target([[2, 2, 20, 20]], [1], image_id=1)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
             "masks": torch.zeros(0, 1, H, W)}
    result = evaluate(Replay([[empty]]), [([image()], [target])], class_names=["x"], device=torch.device("cpu"))
    assert result.metrics["segm"]["AP"] == 0.0
    assert result.metrics["voc"]["bbox"]["mAP"] == 0.0


def test_evaluate_dataset_uses_the_datasets_coco_ground_truth():
    # The dataset's own ground truth (category id 4) has a second object that its targets lack: scoring against
    # `coco` (recall 1/2, AP 0.5) and not against the targets (AP 1.0) shows which ground truth was used.
    target = rect_target([[2, 2, 20, 20]], [1], image_id=8)
    extra = rect_target([[25, 5, 45, 25]], [1], image_id=8)
    annotations = [dict(a, category_id=4) for a in targets_to_coco_annotations(target, 8, 1)]
    annotations += [dict(a, category_id=4) for a in targets_to_coco_annotations(extra, 8, 2)]
    coco = build_coco_ground_truth([{"id": 8, "height": H, "width": W}], annotations, ["x"])
    coco.dataset["categories"] = [{"id": 4, "name": "x"}]
    coco.createIndex()

    class OneImage(torch.utils.data.Dataset):
        class_names = ["x"]
        label_to_category_id = {1: 4}

        def __init__(self):
            self.coco = coco

        def __len__(self):
            return 1

        def __getitem__(self, index):
            return image(), target

    result = evaluate_dataset(Replay([[as_output(target, [0.9])]]), OneImage(), batch_size=1, device=torch.device("cpu"))
    assert result.metrics["voc"]["segm"]["mAP"] == pytest.approx(0.5)
    assert result.detections[0]["category_id"] == 4


class ModeRecorder(Replay):
    """Replay that records whether it was in train mode at each call."""

    def __init__(self, outputs_per_call):
        super().__init__(outputs_per_call)
        self.modes = []

    def forward(self, images):
        self.modes.append(self.training)
        return super().forward(images)


def test_evaluate_runs_in_eval_mode_restores_the_mode_and_keeps_the_pictured_outputs():
    targets = [rect_target([[2, 2, 20, 20]], [1], image_id=i) for i in range(3)]
    outputs = [as_output(t, [0.9]) for t in targets]
    model = ModeRecorder([outputs[:2], outputs[2:]]).train()
    batches = [([image(), image()], targets[:2]), ([image()], targets[2:])]
    result = evaluate(model, batches, class_names=["x"], device=torch.device("cpu"), num_vis=2)
    assert model.modes == [False, False] and model.training
    assert len(result.pictures) == 2 and result.class_names == ["x"]
    picture = result.pictures[1]
    assert picture.target is targets[1] and torch.equal(picture.image, image())
    assert picture.output["masks"].dtype == torch.bool and picture.output["masks"].shape == (1, H, W)
    assert torch.equal(picture.output["masks"], targets[1]["masks"].bool())  # binarised at 0.5
    assert torch.equal(picture.output["boxes"], targets[1]["boxes"])
    assert "proposals" not in picture.output  # a model without `inference(..., return_proposals=True)`


def test_pictured_outputs_carry_the_proposals_of_our_model(tiny_config, tmp_path):
    """Our MaskRCNN returns its proposals from `inference`, which the report draws; evaluation calls it in eval
    mode (inference requires it) and its outputs are those of a plain call."""
    from maskrcnn.model import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config(tmp_path).model).train()
    pictured = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    target = {"image_id": 1, "boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1]),
              "masks": torch.ones(1, 64, 64, dtype=torch.uint8)}
    result = evaluate(model, [([pictured], [target])], class_names=["a", "b"], device=torch.device("cpu"), num_vis=1)
    assert model.training
    output = result.pictures[0].output
    assert output["proposals"].ndim == 2 and output["proposals"].shape[1] == 4
    assert output["proposal_scores"].shape == output["proposals"].shape[:1]
    with torch.no_grad():
        expected = model.eval()([pictured.float() / 255.0])[0]
    torch.testing.assert_close(output["boxes"], expected["boxes"])
    torch.testing.assert_close(output["scores"], expected["scores"])

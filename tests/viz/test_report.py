"""The report: every figure exists and is referenced from report.md and report.html, sections in order, and the
pictures show what evaluation returned."""

from __future__ import annotations

import json
import re

import numpy as np
import torch
from PIL import Image

from maskrcnn.data import build_dataset
from maskrcnn.engine.evaluate import evaluate, evaluate_dataset
from maskrcnn.model import build_model
from maskrcnn.viz.draw import KIND_COLORS, PROPOSAL_COLOR
from maskrcnn.viz.report import (
    ORIGINAL_BOX_MAP,
    ORIGINAL_CLASSES,
    build_report,
    enlarge,
    mask_loss_note,
    metrics_sections,
)


def test_report_references_every_figure(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path, "eval.num_vis=2")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    dataset = build_dataset(cfg.data, "val")
    evaluation = evaluate_dataset(model, dataset, batch_size=2, device=torch.device("cpu"), num_vis=2)
    records = [{"iteration": i, "loss": 5.0 - i, "loss_rpn_cls": 1.0, "loss_rpn_box": 1.0, "loss_box_cls": 1.0,
                "loss_box_reg": 1.0, "loss_mask": 1.0 - 0.1 * i} for i in range(1, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    md_path, html_path = build_report(tmp_path, config=cfg, evaluation=evaluation)
    md, html = md_path.read_text(), html_path.read_text()
    figures = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "figures").glob("*.png"))
    expected = {"loss_rpn", "loss_box_head", "loss_mask_head", "loss_total", "pr_bbox", "pr_segm", "errors",
                "confusion_segm", "confusion_bbox",
                *(f"{stage}_{i}" for stage in ("rpn", "box_head", "mask_head") for i in range(2)),
                *(f"worst_{reason}_{i}" for reason, ids in evaluation.worst.items() for i in range(len(ids)))}
    assert {f.removeprefix("figures/").removesuffix(".png") for f in figures} == expected
    md_refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    html_refs = re.findall(r"<img src='([^']+)'", html)
    assert sorted(md_refs) == figures and sorted(html_refs) == figures
    assert all((tmp_path / ref).is_file() for ref in md_refs)
    # The original README's order: RPN, BoxHead, MaskHead, precision-recall; then metrics and config.
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    assert headings == ["Browse the images", "RPN", "BoxHead", "MaskHead", "Precision-recall", "Metrics", "Errors",
                        "AP by object size", "Masks against their boxes", "Confusion matrix", "Worst images",
                        "Total loss", "Config"]
    ceiling = evaluation.metrics["mask_ceiling"]
    assert list(ceiling) == ["mask_size", "target", "GT in box"] and ceiling["mask_size"] == 28
    assert "| its 28x28 training targets, pasted back |" in md and "The largest loss of mask AP, " in html
    assert "[the 2 pictured val images" in md and "<a href='browse_val.html'>" in html
    assert (tmp_path / "browse_val.html").is_file()
    pictured = sorted(f"{int(p.target['image_id'])}.png" for p in evaluation.pictures)
    assert sorted(p.name for p in (tmp_path / "browse_val").iterdir()) == pictured and len(pictured) == 2
    assert "original project (BoxHead)" not in md + html  # shapes, not the original task: no 0.503 row
    assert "mAP@0.5 (original metric)" in md
    assert "synthetic_image_size" in md
    assert "weighted loss" not in md  # model.mask_head.loss_weight 1: the curve plots the paper's loss


def test_a_weighted_mask_loss_is_named_under_its_curve(tiny_config, tmp_path):
    cfg = tiny_config(tmp_path, "model.mask_head.loss_weight=2")
    assert mask_loss_note(cfg) == (" The mask loss curve plots the weighted loss, 2 x the per-pixel binary "
                                   "cross-entropy (model.mask_head.loss_weight: 2).")


def test_original_projects_row_only_for_its_classes():
    def metrics(names):
        stats = dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm", "APl"), 0.5)
        per_class = {"per_class": dict.fromkeys(names, 0.5), "mAP": 0.5}
        return {"bbox": stats, "segm": stats, "num_images": 1, "num_detections": 1,
                "voc": {"iou_thresh": 0.5, "bbox": per_class, "segm": per_class}}

    def table_rows(names):
        (section,) = metrics_sections(metrics(names))
        return [row[0] for row in section.tables[0][1]]

    assert table_rows(ORIGINAL_CLASSES) == ["boxes", "masks", "original project (BoxHead)"]
    assert f"{ORIGINAL_BOX_MAP}" in " ".join(metrics_sections(metrics(ORIGINAL_CLASSES))[0].text)
    assert table_rows(["person", "car", "dog"]) == ["boxes", "masks"]


def test_enlarge_scales_image_boxes_and_masks():
    image = torch.arange(12, dtype=torch.uint8).reshape(3, 2, 2)
    masks = torch.tensor([[[1, 0], [0, 0]]], dtype=torch.uint8)
    big, items = enlarge(image, {"boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]]), "masks": masks, "labels": 1}, 3)
    assert big.shape == (3, 6, 6) and big[0, 2, 2] == 0 and big[0, 3, 3] == 3  # pixel (1, 1) of channel 0 is 3
    assert items["boxes"].tolist() == [[0.0, 0.0, 3.0, 3.0]]
    assert items["masks"].shape == (1, 6, 6) and items["masks"].sum() == 9
    assert items["labels"] == 1


class Prepared(torch.nn.Module):
    """A stand-in model with our `inference` signature: one prepared output (with proposals) per image."""

    def __init__(self, output: dict):
        super().__init__()
        self.output = output

    def inference(self, images, return_proposals=False):
        assert not self.training and return_proposals
        return [dict(self.output) for _ in images]


def test_report_draws_what_evaluation_returned(tmp_path, tiny_config):
    """The pictures show the evaluated outputs (no model is run again): a predicted mask at rows/columns 32..56
    and a proposal at 0..10 of a black 64x64 image, enlarged 6x (384 px), right of the ground truth (4 px gap)."""
    cfg = tiny_config(tmp_path, "eval.num_vis=1")
    masks = torch.zeros(1, 1, 64, 64)
    masks[0, 0, 32:56, 32:56] = 0.9
    output = {"boxes": torch.tensor([[32.0, 32.0, 56.0, 56.0]]), "labels": torch.tensor([1]),
              "scores": torch.tensor([0.9]), "masks": masks, "proposals": torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
              "proposal_scores": torch.tensor([0.8])}
    truth = torch.zeros(1, 64, 64, dtype=torch.uint8)
    truth[0, 8:24, 8:24] = 1
    target = {"image_id": 1, "boxes": torch.tensor([[8.0, 8.0, 24.0, 24.0]]), "labels": torch.tensor([1]),
              "masks": truth}
    black = torch.zeros(3, 64, 64, dtype=torch.uint8)
    evaluation = evaluate(Prepared(output), [([black], [target])], class_names=["a", "b"],
                          device=torch.device("cpu"), num_vis=1)
    build_report(tmp_path, config=cfg, evaluation=evaluation)

    right = 384 + 4
    mask_picture = np.asarray(Image.open(tmp_path / "figures" / "mask_head_0.png"))  # (384, 772, 3)
    assert mask_picture.shape == (384, 2 * 384 + 4, 3)
    assert mask_picture[264, right + 264].any()  # inside the predicted mask (6 * 44)
    assert not mask_picture[100, right + 100].any()  # where only the ground truth is
    assert mask_picture[100, 100].any() and not mask_picture[264, 264].any()  # ground truth on the left
    rpn_picture = np.asarray(Image.open(tmp_path / "figures" / "rpn_0.png"))
    assert tuple(rpn_picture[0, right + 30]) == PROPOSAL_COLOR  # top edge of the proposal, 6 * (0..10)
    assert not rpn_picture[264, right + 264].any()  # the RPN picture shows no detections


def test_error_tables_and_the_worst_images_marked(tmp_path, tiny_config):
    """Two 64x64 images: image 1 has a found cat and a missed dog, image 2 a cat and a confident false positive
    (a "cat" on nothing). The tables give the analysis' numbers; the gallery marks the missed dog (left) and the
    background error (right) in their types' colours, enlarged 6x."""
    cfg = tiny_config(tmp_path, "eval.num_vis=2")
    def target(image_id, boxes, labels):
        masks = torch.zeros(len(boxes), 64, 64, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            masks[i, y1:y2, x1:x2] = 1
        return {"image_id": image_id, "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.tensor(labels), "masks": masks}

    def output(t, scores):
        return {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.tensor(scores),
                "masks": t["masks"][:, None].float()}

    targets = [target(1, [[4, 4, 20, 20], [40, 40, 60, 60]], [1, 2]), target(2, [[4, 4, 20, 20]], [1])]
    outputs = [output(target(1, [[4, 4, 20, 20]], [1]), [0.9]),
               output(target(2, [[4, 4, 20, 20], [40, 4, 60, 20]], [1, 1]), [0.9, 0.8])]

    class Replay(torch.nn.Module):
        def forward(self, images):
            return outputs[: len(images)]

    black = torch.zeros(3, 64, 64, dtype=torch.uint8)
    evaluation = evaluate(Replay(), [([black, black], targets)], class_names=["cat", "dog"],
                          device=torch.device("cpu"), num_vis=2)
    md_path, _ = build_report(tmp_path, config=cfg, evaluation=evaluation)
    md = md_path.read_text()
    # cat: 2 objects, matches at 0.9, 0.9, the false positive at 0.8: recall 1 at precision 1 -> AP 1; dog: one
    # object, no detection -> AP 0. TIDE AP 0.5; dropping the background error changes nothing (it ranks last),
    # removing the missed dog leaves the cat: AP 1.
    assert "| background | 0.000 | 1 | 0.000 | 1 |" in md
    assert "| missed | 0.500 | 1 | 0.500 | 1 |" in md
    assert "| AP@0.5 before fixing | 0.500 |  | 0.500 |  |" in md
    assert "| small | 3 |" in md and "| medium | 0 | n/a | n/a |" in md
    assert evaluation.worst == {"missed": [1], "false_positive": [2]}
    missed = np.asarray(Image.open(tmp_path / "figures" / "worst_missed_0.png"))
    assert tuple(missed[6 * 50, 6 * 40 + 1]) == KIND_COLORS["missed"]  # the dog's left edge, ground-truth side
    false_positive = np.asarray(Image.open(tmp_path / "figures" / "worst_false_positive_0.png"))
    right = 384 + 4
    assert tuple(false_positive[6 * 15, right + 6 * 60 - 1]) == KIND_COLORS["bkg"]  # right edge of the "cat"

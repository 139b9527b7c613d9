"""The report: every figure exists and is referenced from report.md and report.html, sections in order."""

from __future__ import annotations

import json
import re

import torch

from maskrcnn.data import build_dataset
from maskrcnn.engine.evaluate import evaluate_dataset
from maskrcnn.model import build_model
from maskrcnn.viz.report import ORIGINAL_BOX_MAP, build_report, enlarge


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
    expected = {"loss_rpn", "loss_box_head", "loss_mask_head", "loss_total", "pr_bbox", "pr_segm",
                *(f"{stage}_{i}" for stage in ("rpn", "box_head", "mask_head") for i in range(2))}
    assert {f.removeprefix("figures/").removesuffix(".png") for f in figures} == expected
    md_refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    html_refs = re.findall(r"<img src='([^']+)'", html)
    assert sorted(md_refs) == figures and sorted(html_refs) == figures
    assert all((tmp_path / ref).is_file() for ref in md_refs)
    # The original README's order: RPN, BoxHead, MaskHead, precision-recall; then metrics and config.
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    assert headings[:5] == ["RPN", "BoxHead", "MaskHead", "Precision-recall", "Metrics"]
    assert headings[-1] == "Config"
    assert f"{ORIGINAL_BOX_MAP:.3f}" in md and f"{ORIGINAL_BOX_MAP:.3f}" in html
    assert "mAP@0.5 (original metric)" in md
    assert "synthetic_image_size" in md


def test_enlarge_scales_image_boxes_and_masks():
    image = torch.arange(12, dtype=torch.uint8).reshape(3, 2, 2)
    masks = torch.tensor([[[1, 0], [0, 0]]], dtype=torch.uint8)
    big, items = enlarge(image, {"boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]]), "masks": masks, "labels": 1}, 3)
    assert big.shape == (3, 6, 6) and big[0, 2, 2] == 0 and big[0, 3, 3] == 3  # pixel (1, 1) of channel 0 is 3
    assert items["boxes"].tolist() == [[0.0, 0.0, 3.0, 3.0]]
    assert items["masks"].shape == (1, 6, 6) and items["masks"].sum() == 9
    assert items["labels"] == 1

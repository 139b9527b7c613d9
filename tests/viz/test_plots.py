"""Loss-curve, PR-curve, error-breakdown and confusion-matrix figures."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from maskrcnn.viz.plots import (
    plot_confusion,
    plot_error_breakdown,
    plot_loss_curves,
    plot_pr_curves,
    read_metrics_jsonl,
)


def test_loss_curves_one_figure_per_stage_present(tmp_path):
    records = [{"iteration": i, "loss": 3.0 / i, "loss_rpn_cls": 1.0 / i, "loss_rpn_box": 0.5 / i,
                "loss_box_cls": 1.0 / i, "loss_box_reg": 0.5 / i} for i in range(1, 6)]
    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n" + json.dumps({"iteration": 5, "eval": {}}) + "\n")
    read = read_metrics_jsonl(log)
    assert read == records  # the evaluation record is skipped
    paths = plot_loss_curves(read, tmp_path / "fig")
    assert set(paths) == {"loss_rpn", "loss_box_head", "loss_total"}  # no loss_mask in these records
    assert all(Image.open(p).size[0] > 100 for p in paths.values())


def test_read_metrics_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_metrics_jsonl(tmp_path / "metrics.jsonl")


def test_pr_curves_with_a_class_without_ground_truth(tmp_path):
    curves = {"a": {"precision": [1.0, 0.5, 0.667], "recall": [0.5, 0.5, 1.0], "ap": 0.83},
              "b": {"precision": [], "recall": [], "ap": None}}
    path = plot_pr_curves(curves, tmp_path / "pr.png", title="test")
    assert Image.open(path).format == "PNG"


def test_error_breakdown_and_confusion_figures(tmp_path):
    dap = {"cls": 0.2, "loc": 0.1, "both": 0.0, "dupe": 0.01, "bkg": 0.05, "missed": 0.0}
    errors = {"bbox": {"dap": dap}, "segm": {"dap": {k: v / 2 for k, v in dap.items()}}}
    path = plot_error_breakdown(errors, tmp_path / "errors.png", names={k: k for k in dap})
    assert Image.open(path).size == (700, 360)
    confusion = {"classes": ["cat", "dog", "background"], "matrix": [[3, 1, 0], [0, 2, 1], [1, 0, 0]]}
    path = plot_confusion(confusion, tmp_path / "confusion.png", title="masks")
    width, height = Image.open(path).size
    assert width > height > 300  # the colour bar makes it wider than tall
    many = {"classes": [f"c{k}" for k in range(80)] + ["background"], "matrix": [[0] * 81 for _ in range(81)]}
    assert Image.open(plot_confusion(many, tmp_path / "many.png", title="80 classes")).size == (1300, 1200)

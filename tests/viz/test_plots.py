"""Loss-curve, PR-curve, error-breakdown and confusion-matrix figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from maskrcnn.viz.plots import (
    plot_confusion,
    plot_error_breakdown,
    plot_loss_curves,
    plot_pr_curves,
    read_metrics_jsonl,
)

# matplotlib's first two line colours (the "tab10" cycle): the first and second line of a panel
FIRST_LINE, SECOND_LINE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)


def pixels_of_colour(path, colour, *, tolerance: int = 40) -> np.ndarray:
    """bool[H, W]: the pixels of the PNG at `path` within `tolerance` of `colour` (RGB 0..255) in every channel
    (anti-aliasing blends a line's edges with the background)."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)  # (H, W, 3)
    return (np.abs(pixels - np.array(colour)) <= tolerance).all(axis=-1)


def test_loss_curves_one_figure_per_stage_present(tmp_path):
    records = [{"iteration": i, "loss": 3.0 / i, "loss_rpn_cls": 1.0 / i, "loss_rpn_box": 0.5 / i,
                "loss_box_cls": 1.0 / i, "loss_box_reg": 0.5 / i} for i in range(1, 6)]
    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n" + json.dumps({"iteration": 5, "eval": {}}) + "\n")
    read = read_metrics_jsonl(log)
    assert read == records  # the evaluation record is skipped
    paths = plot_loss_curves(read, tmp_path / "fig")
    assert set(paths) == {"loss_rpn", "loss_box_head", "loss_total"}  # no loss_mask in these records
    # each panel (5 x 3.5 in at 100 dpi, side by side) draws its curve across its ~400 px wide axes, ~2 px thick:
    # 500-520 pixels of the line colour per panel seen; an empty panel has none (no other artist uses it)
    for name, panels in (("loss_rpn", 2), ("loss_box_head", 2), ("loss_total", 1)):
        line = pixels_of_colour(paths[name], FIRST_LINE)
        assert line.shape == (350, 500 * panels), name
        for panel in np.split(line, panels, axis=1):
            assert panel.sum() >= 300, f"{name}: {panel.sum()} pixels of the curve"


def test_read_metrics_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_metrics_jsonl(tmp_path / "metrics.jsonl")


def test_pr_curves_with_a_class_without_ground_truth(tmp_path):
    curves = {"a": {"precision": [1.0, 0.5, 0.667], "recall": [0.5, 0.5, 1.0], "ap": 0.83},
              "b": {"precision": [], "recall": [], "ap": None}}
    path = plot_pr_curves(curves, tmp_path / "pr.png", title="test")
    assert Image.open(path).format == "PNG"
    # class a's steps span the ~450 px wide axes at ~2 px thick (1350 pixels seen), its legend handle adds ~50;
    # class b has only its legend entry: a ~50-pixel handle of the second colour, nothing in the axes
    assert pixels_of_colour(path, FIRST_LINE).sum() >= 500
    assert 20 <= pixels_of_colour(path, SECOND_LINE).sum() <= 150


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

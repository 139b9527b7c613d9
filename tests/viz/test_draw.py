"""Drawing: colours per class, score filtering, masks coloured where the probability is >= 0.5."""

from __future__ import annotations

import torch
from PIL import Image

from maskrcnn.viz.draw import (
    PROPOSAL_COLOR,
    class_colors,
    draw_detections,
    draw_masks,
    draw_proposals,
    save_png,
    side_by_side,
)


def black(h: int = 40, w: int = 50) -> torch.Tensor:
    return torch.zeros(3, h, w, dtype=torch.uint8)


def test_class_colors_distinct_and_rgb():
    colors = class_colors(3)
    assert len(set(colors)) == 3 and all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in colors)
    assert len(set(class_colors(15))) == 15


def test_draw_detections_filters_by_score_and_colours_masks():
    masks = torch.zeros(2, 1, 40, 50)
    masks[0, 0, 5:35, 5:15] = 0.9  # reaches below its box and label
    masks[1, 0, 20:30, 30:40] = 0.9
    boxes = torch.tensor([[5.0, 5.0, 15.0, 15.0], [30.0, 20.0, 40.0, 30.0]])
    out = draw_detections(black(), boxes, torch.tensor([1, 2]), torch.tensor([0.9, 0.2]), class_names=["a", "b"],
                          masks=masks, score_thresh=0.5, alpha=1.0)
    assert out.dtype == torch.uint8 and out.shape == (3, 40, 50)
    assert tuple(out[:, 30, 10].tolist()) == class_colors(2)[0]  # inside mask 0: its class colour (alpha 1)
    assert tuple(out[:, 9, 10].tolist()) in {(0, 0, 0), (255, 255, 255)}  # the label: white on black
    assert out[:, 25, 35].sum() == 0  # detection 1 scored 0.2: not drawn


def test_draw_masks_threshold_half():
    masks = torch.zeros(1, 1, 40, 50)
    masks[0, 0, :, :10] = 0.6
    masks[0, 0, :, 10:20] = 0.4
    out = draw_masks(black(), masks, torch.tensor([1]), torch.tensor([1.0]), class_names=["a"], alpha=1.0)
    assert tuple(out[:, 0, 0].tolist()) == class_colors(1)[0]
    assert out[:, 0, 15].sum() == 0


def test_draw_proposals_top_n_and_empty():
    proposals = torch.tensor([[1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    out = draw_proposals(black(), proposals, top_n=1)
    assert tuple(out[:, 1, 5].tolist()) == PROPOSAL_COLOR  # top edge of the first proposal
    assert out[:, 20, 25].sum() == 0  # the second one is not drawn
    assert torch.equal(draw_proposals(black(), torch.zeros(0, 4)), black())


def test_ground_truth_without_scores_and_save(tmp_path):
    out = draw_detections(black(), torch.tensor([[2.0, 2.0, 30.0, 30.0]]), torch.tensor([1]), None, class_names=["a"],
                          masks=torch.ones(1, 40, 50, dtype=torch.uint8))
    joined = side_by_side([out, black(30, 20)])
    assert joined.shape == (3, 40, 50 + 4 + 20)
    path = save_png(joined, tmp_path / "sub" / "x.png")
    assert Image.open(path).size == (74, 40)

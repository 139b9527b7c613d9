"""Tiles: the grid of windows, detections moved into the whole image (masks as RLE at the tile's offset), the
duplicates of an object seen by several tiles merged into one, and a 2 x 2 mosaic predicted in tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from maskrcnn.app.pipeline import BatchPredictor
from maskrcnn.app.results import BoxedDetections
from maskrcnn.app.tiles import Tiling, join_windows, merge_windows, tile_starts, tile_windows
from maskrcnn.engine.coco_results import masks_to_rle
from maskrcnn.model.mask_rle import paste_masks_rle


def test_tile_starts_and_windows():
    assert tile_starts(1000, 640, 0.2) == [0, 360]  # step 512; the last tile ends at the edge (1000 - 640)
    assert tile_starts(1500, 640, 0.25) == [0, 480, 860]  # step 480
    assert tile_starts(640, 640, 0.2) == [0] and tile_starts(300, 640, 0.2) == [0]
    assert tile_starts(128, 64, 0.0) == [0, 64]
    assert tile_windows(700, 1000, Tiling(640, 0.2)) == [(0, 0, 640, 640), (360, 0, 1000, 640), (0, 60, 640, 700),
                                                         (360, 60, 1000, 700), (0, 0, 1000, 700)]  # + whole image
    assert tile_windows(300, 500, Tiling(640)) == [(0, 0, 500, 300)]  # smaller than a tile: itself, once
    with pytest.raises(ValueError, match="--overlap 1.0"):
        Tiling(640, 1.0)


def test_a_tile_mask_is_encoded_at_the_tiles_offset():
    """A full 4 x 4 mask in box (0, 0)-(2, 2) of the tile whose corner is (x 3, y 1) covers rows 1-2 and columns
    3-4 of the 4 x 6 image."""
    in_tile = BoxedDetections(torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([1]), torch.tensor([0.9]),
                              torch.ones(1, 4, 4))
    empty = BoxedDetections(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0), torch.zeros(0, 4, 4))
    joined, window_of = join_windows([empty, in_tile], [(0, 0, 3, 4), (3, 1, 6, 4)])
    assert joined.boxes.tolist() == [[3.0, 1.0, 5.0, 3.0]] and window_of.tolist() == [1]
    expected = np.array([[0, 0, 0, 0, 0, 0],
                         [0, 0, 0, 1, 1, 0],
                         [0, 0, 0, 1, 1, 0],
                         [0, 0, 0, 0, 0, 0]], dtype=np.uint8)
    (rle,) = paste_masks_rle(joined.masks, joined.boxes, (4, 6))
    assert (mask_utils.decode(rle) == expected).all() and rle == masks_to_rle(expected[None])[0]


def rect(x0, y0, x1, y1, size=(10, 20)) -> np.ndarray:
    mask = np.zeros(size, dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def test_duplicates_across_windows_are_merged_and_nothing_else():
    """An object at x 6..14 cut by the edge of window 0 (x < 12) and of window 1 (x >= 8): in the columns both
    windows see (8..11) the two parts are the same 16 pixels, so they become one detection with the union of masks
    and boxes and the better score. Detection 2 of window 0 agrees with the seed as well (12 of its 12 pixels in
    columns 8..10) but scores less than detection 0, which is taken. Not merged: two overlapping detections of one
    window (the model's NMS kept both), a detection of another class, and one that touches the object's box but
    shares no pixel."""
    masks = [rect(6, 2, 12, 6), rect(8, 2, 14, 6), rect(6, 2, 11, 6), rect(8, 2, 14, 6), rect(14, 2, 16, 6)]
    boxes = torch.tensor([[6, 2, 12, 6], [8, 2, 14, 6], [6, 2, 11, 6], [8, 2, 14, 6], [13, 2, 16, 6]],
                         dtype=torch.float32)
    labels = torch.tensor([1, 1, 1, 2, 1])
    scores = torch.tensor([0.7, 0.9, 0.6, 0.8, 0.5])
    window_of = torch.tensor([0, 1, 0, 1, 1])
    out_boxes, out_labels, out_scores, out_rles = merge_windows(
        boxes, labels, scores, masks_to_rle(np.stack(masks)), window_of, [(0, 0, 12, 10), (8, 0, 20, 10)],
        merge_overlap=0.5)
    assert out_scores.tolist() == pytest.approx([0.9, 0.8, 0.6, 0.5])
    assert out_boxes.tolist() == [[6, 2, 14, 6], [8, 2, 14, 6], [6, 2, 11, 6], [13, 2, 16, 6]]
    assert out_labels.tolist() == [1, 2, 1, 1]
    assert (mask_utils.decode(out_rles[0]) == rect(6, 2, 14, 6)).all()
    assert [(mask_utils.decode(r) == m).all() for r, m in zip(out_rles[1:], [masks[3], masks[2], masks[4]])] == \
        [True, True, True]


def test_parts_are_compared_where_both_windows_see_them():
    """An object at x 2..17 of a 10 x 20 image, windows x 0..11 and x 8..19: the parts x 2..11 and x 8..17 (40
    pixels each) share 16 pixels, 0.4 of either part, yet in the columns both windows see (8..11) they are the
    same 16 pixels (1.0): one detection. Two objects of one class whose parts share no pixel there stay two."""
    masks = [rect(2, 3, 12, 7), rect(8, 3, 18, 7)]
    boxes = torch.tensor([[2, 3, 12, 7], [8, 3, 18, 7]], dtype=torch.float32)
    windows = [(0, 0, 12, 10), (8, 0, 20, 10)]
    merged = merge_windows(boxes, torch.tensor([1, 1]), torch.tensor([0.9, 0.8]), masks_to_rle(np.stack(masks)),
                           torch.tensor([0, 1]), windows, merge_overlap=0.5)
    assert merged[0].tolist() == [[2, 3, 18, 7]] and (mask_utils.decode(merged[3][0]) == rect(2, 3, 18, 7)).all()
    # a left object ending at x 9 and a right one starting at x 10, both inside the shared columns 8..11
    masks = [rect(2, 3, 10, 7), rect(10, 3, 18, 7)]
    boxes = torch.tensor([[2, 3, 10, 7], [10, 3, 18, 7]], dtype=torch.float32)
    merged = merge_windows(boxes, torch.tensor([1, 1]), torch.tensor([0.9, 0.8]), masks_to_rle(np.stack(masks)),
                           torch.tensor([0, 1]), windows, merge_overlap=0.5)
    assert merged[0].tolist() == [[2, 3, 10, 7], [10, 3, 18, 7]]


def test_a_group_reaches_a_tile_through_a_third_one():
    """An L-shaped object in a 16 x 16 image: a band (y 1..2, x 1..14) and a column (x 12..14, y 1..14). Window 0
    (x, y < 10) sees the band's left part, window 2 (x >= 6, y < 10) the band's right part and the column's top,
    window 1 (x, y >= 6) the column's bottom only. Window 1 is visited first and shares no pixel with window 0's
    part; once window 2's part has joined, it shares the column's rows 6..9 with the group: all three are one."""
    l_shape = np.maximum(rect(1, 1, 15, 3, size=(16, 16)), rect(12, 1, 15, 15, size=(16, 16)))
    windows = [(0, 0, 10, 10), (6, 6, 16, 16), (6, 0, 16, 10)]
    masks = [l_shape * rect(x0, y0, x1, y1, size=(16, 16)) for x0, y0, x1, y1 in windows]
    boxes = torch.tensor([[1, 1, 10, 3], [12, 6, 15, 15], [6, 1, 15, 10]], dtype=torch.float32)
    boxes_out, _, scores_out, rles_out = merge_windows(
        boxes, torch.tensor([1, 1, 1]), torch.tensor([0.9, 0.7, 0.8]), masks_to_rle(np.stack(masks)),
        torch.tensor([0, 1, 2]), windows, merge_overlap=0.5)
    assert boxes_out.tolist() == [[1, 1, 15, 15]] and scores_out.tolist() == pytest.approx([0.9])
    assert (mask_utils.decode(rles_out[0]) == l_shape).all()


class SquareFinder:
    """A stand-in model that finds, in each image it is given, every square of one value of the red channel:
    its box (the pixels' bounds, cut where the tile ends), a full mask and score = value / 255."""

    class_names = ("square",)

    def __call__(self, images):
        found = []
        for image in images:
            red = image[0]
            values = [v for v in red.unique().tolist() if v > 0]
            boxes = []
            for value in values:
                ys, xs = torch.nonzero(red == value, as_tuple=True)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            found.append(BoxedDetections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                         torch.ones(len(values), dtype=torch.int64),
                                         torch.tensor(values, dtype=torch.float32) / 255, torch.ones(len(values), 7, 7)))
        return found


def test_a_mosaic_in_tiles_gives_each_square_once_in_full_coordinates():
    """A 2 x 2 mosaic of 64-pixel images, 128 x 128: squares inside a quadrant, one across the horizontal border
    (rows 54-73) and one across the vertical border (columns 58-69). Tiles of 64 with overlap 0.25 (starts 0, 48,
    64: 9 tiles and the whole image) see the border squares in up to 6 pieces; each comes out once, whole."""
    squares = {50: (10, 10, 20, 20), 100: (40, 54, 50, 74), 150: (90, 90, 100, 100), 200: (58, 30, 70, 40)}
    mosaic = torch.zeros(3, 128, 128, dtype=torch.uint8)
    for value, (x0, y0, x1, y1) in squares.items():
        mosaic[0, y0:y1, x0:x1] = value
    predictor = BatchPredictor(SquareFinder(), score_thresh=0.0, batch_size=4, tiling=Tiling(64, 0.25))
    (result,) = predictor.predict([mosaic])
    assert sorted(map(tuple, result.boxes.tolist())) == sorted(squares.values())
    for box, rle in zip(result.boxes.tolist(), result.rles):
        assert (mask_utils.decode(rle) == rect(*map(int, box), size=(128, 128))).all()
    untiled = BatchPredictor(SquareFinder(), score_thresh=0.0, tiling=None).predict([mosaic])[0]
    assert sorted(map(tuple, untiled.boxes.tolist())) == sorted(squares.values())


def test_tiles_of_a_real_model_map_to_full_coordinates(tiny_run):
    """Tiles that are exactly the quadrants of a mosaic (64-pixel tiles, no overlap, no whole-image pass) give
    each quadrant's own detections, moved by its corner: boxes, scores and masks."""
    from maskrcnn.app.detectors import CheckpointDetector
    from maskrcnn.data import build_dataset
    from maskrcnn.engine.checkpoint import load_model

    loaded = load_model(tiny_run / "last.pt", overrides=["model.box_head.score_thresh=0"])
    detector, dataset = CheckpointDetector(loaded), build_dataset(loaded.config.data, "val")
    quadrants = [dataset[index % len(dataset)][0] for index in range(4)]
    mosaic = torch.cat([torch.cat(quadrants[:2], dim=2), torch.cat(quadrants[2:], dim=2)], dim=1)  # (3, 128, 128)
    tiled = BatchPredictor(detector, score_thresh=0.0, tiling=Tiling(64, 0.0, whole_image=False)).predict([mosaic])[0]
    alone = BatchPredictor(detector, score_thresh=0.0).predict(quadrants)
    expected = []
    for result, (x0, y0) in zip(alone, [(0, 0), (64, 0), (0, 64), (64, 64)]):
        for box, score, rle in zip(result.boxes.tolist(), result.scores.tolist(), result.rles):
            dense = np.zeros((128, 128), dtype=np.uint8)
            dense[y0:y0 + 64, x0:x0 + 64] = mask_utils.decode(rle)
            expected.append(([box[0] + x0, box[1] + y0, box[2] + x0, box[3] + y0], score, dense))
    assert len(tiled) == len(expected) > 0
    for (box, score, dense), got_box, got_score, got_rle in zip(sorted(expected, key=lambda e: -e[1]),
                                                                tiled.boxes.tolist(), tiled.scores.tolist(), tiled.rles):
        np.testing.assert_allclose(got_box, box, atol=1e-4)
        assert got_score == pytest.approx(score, abs=1e-6)
        assert (mask_utils.decode(got_rle) == dense).all()


"""The Python result API: `Predictor` on a path, array, tensor, PIL image, list or video, and its `Result`s."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.app.predictor import Predictor, as_image
from maskrcnn.app.results import Result
from maskrcnn.data.common import DatasetError
from maskrcnn.viz.draw import draw_detections, draw_rle_detections


@pytest.fixture(scope="module")
def predictor(tiny_run):
    return Predictor(tiny_run / "last.pt", score_thresh=0.0, overrides=["model.box_head.score_thresh=0"])


def photo() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8)


def test_every_kind_of_image_gives_the_same_result(predictor, tmp_path):
    Image.fromarray(photo()).save(tmp_path / "x.png")
    from_path = predictor(tmp_path / "x.png")
    assert isinstance(from_path, Result) and len(from_path) > 0 and from_path.source == str(tmp_path / "x.png")
    tensor = torch.from_numpy(photo()).permute(2, 0, 1)
    for other in (predictor(photo()), predictor(Image.fromarray(photo())), predictor(tensor),
                  predictor(tensor.float() / 255), predictor([photo()])[0], predictor(tmp_path)[0]):
        assert other.rles == from_path.rles and torch.equal(other.boxes, from_path.boxes)
    assert from_path.class_names == predictor.class_names == ["circle", "square"]
    with pytest.raises(DatasetError, match="broken.png: cannot decode image"):
        (tmp_path / "broken.png").write_bytes(b"no")
        predictor(tmp_path / "broken.png")
    with pytest.raises(ValueError, match=r"expected an RGB array \[H, W, 3\]"):
        as_image(np.zeros((4, 4)))


def test_result_masks_polygons_coco_and_pictures(predictor, tmp_path):
    result = predictor(photo())
    assert result.masks.shape == (len(result), 48, 64) and result.masks.dtype == torch.bool
    assert [int(m.sum()) for m in result.masks] == [int(mask_utils.area(r)) for r in result.rles]
    assert result.names == [predictor.class_names[int(k) - 1] for k in result.labels]
    coco = result.to_coco(image_id=7, label_to_category_id={1: 11, 2: 12})
    assert [c["category_id"] for c in coco] == [10 + int(k) for k in result.labels]
    x0, y0, x1, y1 = result.boxes[0].tolist()
    assert coco[0]["image_id"] == 7 and coco[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])
    assert coco[0]["segmentation"] == result.rles[0]
    polygons = result.to_coco(format="polygons")
    assert [p["segmentation"] for p in polygons] == result.polygons
    # the same picture as drawing dense masks, pixel for pixel
    dense = draw_detections(result.image, result.boxes, result.labels, result.scores,
                            class_names=result.class_names, masks=result.masks)
    assert torch.equal(result.plot(), dense)
    assert torch.equal(draw_rle_detections(result.image, result.boxes, result.labels, result.scores, result.rles,
                                           class_names=result.class_names), dense)
    assert Image.open(result.save(tmp_path / "p.png")).size == (64, 48)


def test_a_polygon_of_a_hand_made_mask():
    """A 3 x 4 block at rows 2-4, columns 1-4: OpenCV's outline through the corner pixels' centres, half a
    pixel inside the block's edges (x 1.5 .. 4.5, y 2.5 .. 4.5)."""
    from maskrcnn.app.results import mask_polygons

    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:5, 1:5] = 1
    (polygon,) = mask_polygons(mask_utils.encode(np.asfortranarray(mask)))
    assert sorted(zip(polygon[0::2], polygon[1::2])) == [(1.5, 2.5), (1.5, 4.5), (4.5, 2.5), (4.5, 4.5)]


def test_stream_yields_every_frame_with_its_index(predictor, tmp_path):
    av = pytest.importorskip("av")
    with av.open(str(tmp_path / "clip.mp4"), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(4):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 60 * k, np.uint8))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frames = list(predictor.stream(tmp_path / "clip.mp4", every=3))
    assert [(f.frame, f.timestamp) for f in frames] == [(0, 0.0), (3, 0.3)]
    assert all(f.image is not None and f.plot().shape == (3, 48, 64) for f in frames)


def test_rle_pixels_read_the_runs():
    """Both RLE forms give the pixels of a hand-made 5 x 7 mask: its uncompressed counts (column-major runs,
    zeros first) and pycocotools' compressed string (bytes or str)."""
    from maskrcnn.viz.draw import rle_pixels

    mask = np.zeros((5, 7), dtype=np.uint8)
    mask[1:3, 2:6] = 1
    mask[4, 0] = 1
    # column 0: rows 0-3 off, row 4 on; column 1 and row 0 of column 2 off (6); then in columns 2-5 rows 1-2 on
    # and the 3 rows between off; the last 2 rows of column 5 and column 6 off (7)
    counts = [4, 1, 6, 2, 3, 2, 3, 2, 3, 2, 7]
    compressed = mask_utils.encode(np.asfortranarray(mask))
    for rle in ({"size": [5, 7], "counts": counts}, compressed, {**compressed, "counts": compressed["counts"].decode()}):
        rows, cols = rle_pixels(rle)
        assert sorted(zip(rows.tolist(), cols.tolist())) == sorted(zip(*np.nonzero(mask)))

"""Video: `maskrcnn predict CKPT clip.mp4` writes an overlay video with every frame predicted and results per
frame (index and time); --every N; a corrupt frame is skipped with a warning; an unreadable video or a missing
PyAV is one line naming the file; a stopped run keeps the frames done, its overlay video finished."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maskrcnn.app.pipeline import BatchPredictor
from maskrcnn.app.predict import PredictionWriter, output_names, predict_to_folder
from maskrcnn.app.results import BoxedDetections
from maskrcnn.app.sources import collect_inputs, read_frames
from maskrcnn.app.video import read_video
from maskrcnn.cli import main

av = pytest.importorskip("av")


def write_video(path, codec: str, frames: int, rate: int = 5, pix_fmt: str = "yuv420p") -> None:
    """A video of `frames` 64 x 64 frames, frame k a flat grey of 40 k with a bright square moving right."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 64, pix_fmt
        for k in range(frames):
            array = np.full((64, 64, 3), 40 * k, dtype=np.uint8)
            array[20:40, 5 + 5 * k:25 + 5 * k] = 250
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def count_frames(path) -> int:
    return sum(1 for _ in read_video(str(path)))


def test_a_video_gives_an_overlay_video_and_results_per_frame(tiny_run, tmp_path, capsys):
    write_video(tmp_path / "clip.mp4", "libx264", frames=5)
    out = tmp_path / "pred"
    assert main(["predict", str(tiny_run / "last.pt"), str(tmp_path / "clip.mp4"), "--out", str(out),
                 "--score-thresh", "0", "--set", "model.box_head.score_thresh=0", "--batch-size", "2"]) == 0
    assert count_frames(out / "clip.mp4_pred.mp4") == 5
    with av.open(str(out / "clip.mp4_pred.mp4")) as container:
        assert container.streams.video[0].average_rate == 5  # the source's frame rate
    records = json.loads((out / "images.json").read_text())
    assert [(r["image_id"], r["frame"], r["timestamp"]) for r in records] == [
        (1, 0, 0.0), (2, 1, 0.2), (3, 2, 0.4), (4, 3, 0.6), (5, 4, 0.8)]
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions and all(p["file_name"] == str(tmp_path / "clip.mp4") for p in predictions)
    assert {(p["image_id"], p["frame"], p["timestamp"]) for p in predictions} <= {
        (r["image_id"], r["frame"], r["timestamp"]) for r in records}
    assert sum(r["detections"] for r in records) == len(predictions)

    assert main(["predict", str(tiny_run / "last.pt"), str(tmp_path / "clip.mp4"), "--out", str(tmp_path / "every"),
                 "--every", "2"]) == 0
    records = json.loads((tmp_path / "every" / "images.json").read_text())
    assert [r["frame"] for r in records] == [0, 2, 4]
    assert count_frames(tmp_path / "every" / "clip.mp4_pred.mp4") == 3
    with av.open(str(tmp_path / "every" / "clip.mp4_pred.mp4")) as container:
        assert container.streams.video[0].average_rate == pytest.approx(2.5)  # same duration as the source


def test_a_corrupt_frame_is_skipped_and_the_others_predicted(tiny_run, tmp_path, capsys):
    """PNG frames in a .mov: the signature of frame 2 overwritten makes FFmpeg refuse that frame only."""
    write_video(tmp_path / "clip.mov", "png", frames=5, pix_fmt="rgb24")
    data = bytearray((tmp_path / "clip.mov").read_bytes())
    starts = [i for i in range(len(data) - 3) if data[i:i + 4] == b"\x89PNG"]
    assert len(starts) == 5
    data[starts[2]:starts[2] + 40] = bytes(40)
    (tmp_path / "clip.mov").write_bytes(data)
    capsys.readouterr()
    assert main(["predict", str(tiny_run / "last.pt"), str(tmp_path / "clip.mov"), "--out", str(tmp_path / "p"),
                 "--no-overlays"]) == 0
    assert f"maskrcnn: warning: {tmp_path / 'clip.mov'}: skipped a corrupt frame (index 2)" in capsys.readouterr().err
    assert [r["frame"] for r in json.loads((tmp_path / "p" / "images.json").read_text())] == [0, 1, 3, 4]


def test_unreadable_video_and_missing_pyav_are_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    (tmp_path / "clip.mp4").write_bytes(b"not a video at all" * 10)
    capsys.readouterr()
    assert main(["predict", str(tiny_run / "last.pt"), str(tmp_path / "clip.mp4"), "--out", str(tmp_path / "p")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("maskrcnn: error: none of the 1 image(s) could be read: ")
    assert f"{tmp_path / 'clip.mp4'}: cannot open video" in error
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    assert main(["predict", str(tiny_run / "last.pt"), str(tmp_path / "clip.mp4"), "--out", str(tmp_path / "q")]) == 2
    assert capsys.readouterr().err.strip() == (f"maskrcnn: error: {tmp_path / 'clip.mp4'}: reading and writing video "
                                               f"needs PyAV: pip install maskrcnn[video]")
    assert not (tmp_path / "q").exists()


class StopsAtCall:
    """A stand-in model: one full-mask detection in box (2, 1)-(5, 3) per frame; KeyboardInterrupt at call `stop_at`
    (as Ctrl-C during the model)."""

    class_names = ("thing",)

    def __init__(self, stop_at: int) -> None:
        self.calls, self.stop_at = 0, stop_at

    def __call__(self, images):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return [BoxedDetections(torch.tensor([[2.0, 1.0, 5.0, 3.0]]), torch.tensor([1]), torch.tensor([0.9]),
                                torch.ones(1, 4, 4)) for _ in images]


def test_a_stopped_video_run_keeps_the_frames_done(tmp_path):
    """Batches of 2 frames of a 5-frame video, stopped in the model's 2nd call: frames 0 and 1 are in both json
    files, and the overlay video is finished, playable, with those 2 frames."""
    write_video(tmp_path / "clip.mp4", "libx264", frames=5)
    inputs = collect_inputs([tmp_path / "clip.mp4"])
    writer = PredictionWriter(tmp_path / "p", [{"id": 3, "name": "thing"}], output_names(inputs))
    with pytest.raises(KeyboardInterrupt):
        predict_to_folder(inputs, BatchPredictor(StopsAtCall(stop_at=2), batch_size=2), writer, progress=False)
    assert [r["frame"] for r in json.loads((tmp_path / "p" / "images.json").read_text())] == [0, 1]
    predictions = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert [(p["frame"], p["category_id"], p["bbox"]) for p in predictions] == [
        (0, 3, [2.0, 1.0, 3.0, 2.0]), (1, 3, [2.0, 1.0, 3.0, 2.0])]
    assert count_frames(tmp_path / "p" / "clip.mp4_pred.mp4") == 2


def test_a_camera_device_is_a_live_video_opened_with_v4l2(monkeypatch):
    """/dev/video<N> is a video input (not refused as a character device), named like a stream in the outputs and
    opened with FFmpeg's v4l2 input; one that does not open is one line naming it, as any video."""
    (camera,) = collect_inputs(["/dev/video7"])
    assert (camera.path, camera.kind) == ("/dev/video7", "video")
    assert output_names([camera]) == {"/dev/video7": Path("stream1_pred.mp4")}
    opened = []

    def fake_open(path, **kwargs):
        opened.append((path, kwargs["format"]))
        raise OSError(19, "No such device")

    monkeypatch.setattr(av, "open", fake_open)
    (frame,) = read_frames([camera])
    assert opened == [("/dev/video7", "v4l2")]
    assert frame.image is None and frame.error.startswith("/dev/video7: cannot open video (")

"""Video in and out with PyAV (FFmpeg), the optional extra `maskrcnn[video]`: frames of a file or stream URL as
uint8 [3, H, W] tensors with their index and time, and an overlay video written at the source's frame rate.
Files, stream URLs (rtsp://, http://, ...) and V4L2 cameras (/dev/video0) are read alike, where FFmpeg opens them.

A corrupt packet is skipped with a warning and the frames after it still decoded; a file FFmpeg cannot open or
decode (no video stream, an unknown codec) is a `VideoError` naming it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Self

import numpy as np
import torch
from torch import Tensor

from maskrcnn.errors import UserError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset((".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".wmv", ".flv"))
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
OVERLAY_CODEC = "libx264"  # H.264 in .mp4: plays in browsers and every player
# x264's veryfast preset: encoding beside the model takes a fraction of its default (medium) CPU time
OVERLAY_OPTIONS = {"preset": "veryfast", "crf": "23"}
DEFAULT_RATE = Fraction(25)  # frame rate of an overlay video when the source states none


class VideoError(UserError):
    """A video that cannot be opened or decoded; the message names it."""


def is_stream_url(text: str) -> bool:
    return text.lower().startswith(STREAM_SCHEMES)


def is_camera(text: str) -> bool:
    """A V4L2 camera device (/dev/video0, ...), opened with FFmpeg's v4l2 input."""
    return re.fullmatch(r"/dev/video\d+", text) is not None


def is_live(text: str) -> bool:
    """A stream URL or a camera: a video without a file (named stream<k> in outputs)."""
    return is_stream_url(text) or is_camera(text)


def require_pyav(path: str):
    """The `av` module, or a UserError naming the video and the install command."""
    try:
        import av
    except ImportError:
        raise UserError(f"{path}: reading and writing video needs PyAV: pip install maskrcnn[video]") from None
    return av


def _open(path: str):
    av = require_pyav(path)
    try:
        container = av.open(path, format="v4l2" if is_camera(path) else None,
                            options={"rw_timeout": "30000000"} if is_stream_url(path) else None)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as error:
        raise VideoError(f"{path}: cannot open video ({' '.join(str(error).split())})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: holds no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None or stream.codec_context.name in (None, "none"):
        container.close()
        raise VideoError(f"{path}: video codec not supported by this FFmpeg build")
    stream.thread_type = "AUTO"  # FFmpeg decodes with several threads; it releases the GIL meanwhile
    return av, container, stream


def frame_rate(path: str) -> Fraction:
    """The source's average frame rate (DEFAULT_RATE when it states none)."""
    _, container, stream = _open(path)
    with container:
        return Fraction(stream.average_rate or stream.guessed_rate or DEFAULT_RATE)


def frame_count(path: str) -> int | None:
    """The number of frames the container states (None when it states none, or the video cannot be opened)."""
    try:
        _, container, stream = _open(path)
    except VideoError:
        return None
    with container:
        return stream.frames or None


def read_video(path: str, *, every: int = 1) -> Iterator[tuple[int, float | None, Tensor]]:
    """(frame index, time in seconds, uint8[3, H, W]) of every `every`-th frame (index 0, every, 2 every, ...).

    The index counts every frame of the source, a corrupt one included, which is skipped with a warning.

    Raises:
        VideoError: it cannot be opened or its codec is not supported.
    """
    av, container, stream = _open(path)
    index = 0
    with container:
        try:
            packets = container.demux(stream)
            for packet in packets:
                try:
                    frames = packet.decode()
                except av.InvalidDataError as error:
                    log.warning(f"{path}: skipped a corrupt frame (index {index}): {' '.join(str(error).split())}")
                    index += 1
                    continue
                for frame in frames:
                    if index % every == 0:
                        image = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)  # (H, W, 3)
                        yield index, frame.time, image
                    index += 1
        except av.DecoderNotFoundError:
            raise VideoError(f"{path}: video codec not supported by this FFmpeg build") from None
        except av.FFmpegError as error:
            raise VideoError(f"{path}: cannot decode video after frame {index} "
                             f"({' '.join(str(error).split())})") from None


class VideoWriter:
    """An H.264 .mp4 written frame by frame (uint8 [3, H, W], all one size) at a given frame rate; odd sizes are
    padded by one black row or column (H.264 in yuv420p needs even sides). Close it (or use `with`) to finish
    the file: a stopped run still leaves a playable video of the frames written."""

    def __init__(self, path: str | Path, rate: Fraction) -> None:
        self.path = Path(path)
        self.rate = rate
        self._container = None
        self._stream = None
        self.frames = 0

    def write(self, image: Tensor) -> None:
        av = require_pyav(str(self.path))
        height, width = image.shape[-2] + image.shape[-2] % 2, image.shape[-1] + image.shape[-1] % 2
        if self._container is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(str(self.path), mode="w")
            self._stream = self._container.add_stream(OVERLAY_CODEC, rate=self.rate)
            self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
            self._stream.options = OVERLAY_OPTIONS
        array = np.zeros((height, width, 3), dtype=np.uint8)
        array[: image.shape[-2], : image.shape[-1]] = image.permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._container is None:
            return
        for packet in self._stream.encode():  # flush the encoder's delayed frames
            self._container.mux(packet)
        self._container.close()
        self._container = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

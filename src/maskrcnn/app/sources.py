"""What prediction reads: image files, folders (optionally recursive), glob patterns, video files, stream URLs and
camera devices (/dev/video<N>), turned into one sequence of frames (an image is a frame of its own).

Only regular files are read (and cameras named /dev/video<N>, which FFmpeg's v4l2 input reads): a named pipe,
device or socket would block or never end, so one named on the command line is refused with one line, and one
inside a folder is skipped and listed. A folder yields every image type
Pillow reads and every video type, and lists in a warning what else it held.
"""

from __future__ import annotations

import glob
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from PIL import Image
from torch import Tensor

from maskrcnn.app import video
from maskrcnn.data.common import DatasetError, read_rgb, read_size
from maskrcnn.errors import UserError

log = logging.getLogger(__name__)

# Pixels of an image predicted in one piece: beyond it (its float copies alone take 1.4 GB, and the model shrinks it
# to its max_size, small objects and all) prediction asks for tiles (--tile), which are cut from it one by one.
UNTILED_MAX_PIXELS = 40_000_000
GLOB_CHARACTERS = frozenset("*?[")
SKIPPED_SHOWN = 5  # names of skipped files a warning shows


@cache
def image_suffixes() -> frozenset[str]:
    """The file suffixes of every image format Pillow can open here (.png, .jpg, .tif, .webp, .gif, ...)."""
    Image.init()
    return frozenset(suffix for suffix, name in Image.registered_extensions().items() if name in Image.OPEN)


@dataclass(frozen=True)
class Input:
    """One thing to predict on: an image file, or a video file or stream URL (`kind` "image" or "video")."""

    path: str
    kind: str


@dataclass
class Frame:
    """One image, or one frame of a video, as read; `image` is None when it could not be read (`error` says why).

    Attributes:
        source: the image or video file (or URL).
        number: the frame's place in the whole run, counting from 1 (the default image id of its results).
        image: uint8[3, H, W].
        frame: index of the frame in its video (every decoded frame counts), None for an image file.
        timestamp: its presentation time in seconds, None for an image file.
        error: the one-line reason it could not be read.
    """

    source: str
    number: int
    image: Tensor | None = None
    frame: int | None = None
    timestamp: float | None = None
    error: str | None = None


def _file_type(mode: int) -> str | None:
    """What a non-regular file is, for the message (None: a regular file)."""
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "video" if suffix in video.VIDEO_SUFFIXES else "image" if suffix in image_suffixes() else None


def _folder_entries(paths: Iterable[Path], skipped: list[str]) -> list[Input]:
    """The image and video files among `paths` (sorted); the others go to `skipped` with their reason."""
    found = []
    for path in sorted(paths):
        if path.is_dir() and not path.is_symlink():
            continue
        try:
            kind = _file_type(path.stat().st_mode)
        except OSError as error:
            skipped.append(f"{path} ({error.strerror})")
            continue
        if kind is not None:
            skipped.append(f"{path} ({kind})")
        elif _kind(path) is None:
            skipped.append(f"{path} (not an image or video type)")
        else:
            found.append(Input(str(path), _kind(path)))
    return found


def _one_input(text: str, recursive: bool, skipped: list[str]) -> list[Input]:
    if video.is_live(text):  # a stream URL or a camera device: FFmpeg opens it (or says why not)
        return [Input(text, "video")]
    path = Path(text)
    if path.is_dir():
        found = _folder_entries(path.rglob("*") if recursive else path.iterdir(), skipped)
        if not found:
            raise UserError(f"{path}: no image or video files{' (searched below it: --recursive)' * recursive}")
        return found
    if not path.exists() and GLOB_CHARACTERS & set(text):
        found = _folder_entries((Path(p) for p in glob.glob(text, recursive=True)), skipped)
        if not found:
            raise UserError(f"{text}: no image or video file matches this pattern")
        return found
    if not path.exists():
        raise UserError(f"image, video or folder not found: {path}")
    kind = _file_type(path.stat().st_mode)
    if kind is not None:
        raise UserError(f"{path}: {kind}, not a file; give image or video files, folders or stream URLs")
    return [Input(text, _kind(path) or "image")]  # an unknown suffix: Pillow decides from the contents


def collect_inputs(inputs: Iterable[str | Path], *, recursive: bool = False) -> list[Input]:
    """The images and videos named, held by the folders (their files only, or every file below them with
    `recursive`) or matched by the glob patterns (`**` for any depth) of `inputs`, each once, in the order given,
    folders and matches sorted. Logs a warning listing the files of folders and patterns that were skipped.

    Raises:
        UserError: an input does not exist, is not a regular file, or a folder or pattern holds nothing to predict;
            a video without PyAV installed.
    """
    found: list[Input] = []
    skipped: list[str] = []
    for text in inputs:
        found += _one_input(str(text), recursive, skipped)
    if skipped:
        shown = ", ".join(skipped[:SKIPPED_SHOWN]) + (f" and {len(skipped) - SKIPPED_SHOWN} more"
                                                       if len(skipped) > SKIPPED_SHOWN else "")
        log.warning(f"skipped {len(skipped)} file(s) that are not images or videos: {shown}")
    seen: set[str] = set()
    unique = []
    for item in found:  # a file named twice (or named and inside a named folder) is predicted once
        key = item.path if video.is_live(item.path) else os.path.abspath(item.path)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    if any(item.kind == "video" for item in unique):
        video.require_pyav(next(item.path for item in unique if item.kind == "video"))
    return unique


def _header_size(path: str) -> tuple[int, int] | None:
    """(h, w) from the file's header; None when it cannot be read (decoding it then says why)."""
    try:
        return read_size(Path(path))
    except DatasetError:
        return None


def read_image(path: str, *, max_pixels: int | None) -> Tensor:
    """uint8[3, H, W] of an image file (`data.common.read_rgb`), checked to be a regular file again just before
    it is opened (no read can block on a pipe) and, unless `max_pixels` is None, to be at most that large.

    Raises:
        DatasetError: not a regular file, unreadable, or too large (the message says to use --tile).
    """
    kind = _file_type(os.stat(path).st_mode) if os.path.exists(path) else None
    if kind is not None:
        raise DatasetError(f"{path}: {kind}, not an image file")
    if max_pixels is not None and (size := _header_size(path)) is not None:
        height, width = size
        if height * width > max_pixels:
            raise DatasetError(f"{path}: {width} x {height} pixels is more than the {max_pixels} predicted in one "
                               f"piece; predict it in tiles: --tile 1024 --overlap 0.2")
    return read_rgb(Path(path))


def read_frames(inputs: Iterable[Input], *, every: int = 1, tiled: bool = False) -> Iterator[Frame]:
    """Every image, and every `every`-th frame of every video, as `Frame`s numbered from 1 in order. An input
    that cannot be read (or a video that cannot be opened) is one Frame with its error, logged as a warning;
    corrupt frames inside a video are skipped with a warning (`video.read_video`)."""
    number = 0
    for item in inputs:
        if item.kind == "image":
            number += 1
            try:
                yield Frame(item.path, number, read_image(item.path, max_pixels=None if tiled else UNTILED_MAX_PIXELS))
            except (DatasetError, OSError) as error:
                message = str(error) if isinstance(error, DatasetError) else f"{item.path}: {error.strerror}"
                log.warning(f"skipped {message}")
                yield Frame(item.path, number, error=message)
            continue
        try:
            for index, timestamp, image in video.read_video(item.path, every=every):
                number += 1
                yield Frame(item.path, number, image, frame=index, timestamp=timestamp)
        except video.VideoError as error:
            number += 1
            log.warning(f"skipped {error}")
            yield Frame(item.path, number, error=str(error))

"""What a POST /predict request carries: the image's bytes (raw with their Content-Type, or the file of a multipart
form), read up to a byte limit, and decoded as `maskrcnn predict` decodes a file (`data.common.image_to_rgb`),
with a pixel limit checked from the header before the pixels are decoded.

Every refusal is a `RequestError`: an HTTP status and one line naming what was wrong.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import AsyncIterator

from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from torch import Tensor

from maskrcnn.data.common import image_to_rgb
from maskrcnn.errors import UserError

# formats decoded; Pillow's others (EPS through Ghostscript, ...) are not opened from a request
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF")
# Content-Types taken as the image's bytes (a missing one too); multipart/form-data is read as a form
RAW_TYPES = ("application/octet-stream", "")


class RequestError(UserError):
    """A request refused with `status` and a one-line `message`; `headers` go into the answer (Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused (413) as soon as it passes `max_bytes`: from Content-Length before reading, while
    reading for a chunked body."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(413, f"the body of {declared} bytes is over the limit of {max_bytes} bytes (--max-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, f"the body is over the limit of {max_bytes} bytes (--max-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_bytes(request: Request, max_bytes: int) -> bytes:
    """The image's bytes of a request: its body (image/*, application/octet-stream or no Content-Type) or the
    first file of its multipart/form-data body."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()
    if media_type != "multipart/form-data" and not media_type.startswith("image/") and media_type not in RAW_TYPES:
        raise RequestError(415, f"Content-Type {media_type} is not an image: send the image's bytes with its type "
                                f"(e.g. image/jpeg) or a multipart/form-data form with the image as a file")
    body = await read_body(request, max_bytes)
    if media_type != "multipart/form-data":
        return body
    return await _form_file(request, body)


async def _form_file(request: Request, body: bytes) -> bytes:
    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=16).parse()
    except MultiPartException as error:
        raise RequestError(400, f"bad multipart/form-data body: {error.message}") from None
    try:
        upload = next((value for _, value in form.multi_items() if isinstance(value, UploadFile)), None)
        if upload is None:
            raise RequestError(400, "the multipart/form-data body has no file: send the image as a file field")
        return await upload.read()
    finally:
        await form.close()


def decode_image(data: bytes, max_pixels: int) -> Tensor:
    """uint8[3, H, W] of an image file's bytes (upright as its EXIF orientation says).

    Raises:
        RequestError: 400 for an empty body or bytes that are not a decodable image of IMAGE_FORMATS, 413 for an
            image of more than `max_pixels` pixels (refused from its header, before its pixels are decoded).
    """
    if not data:
        raise RequestError(400, "the body is empty: send an image's bytes")
    try:
        with warnings.catch_warnings():  # Pillow's own bomb limits give way to max_pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise RequestError(413, f"the image of {width} x {height} pixels is over the limit of "
                                            f"{max_pixels} pixels (--max-pixels)")
                return image_to_rgb(image)
    except Image.DecompressionBombError as error:
        raise RequestError(413, f"the image is over the pixel limit: {error}") from None
    except UnidentifiedImageError:
        raise RequestError(400, f"the body is not an image of a known format ({', '.join(IMAGE_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        detail = " ".join(str(error).split())
        raise RequestError(400, f"the body is not a decodable image ({', '.join(IMAGE_FORMATS)}): {detail}") from None

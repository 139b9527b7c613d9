"""The settings of `maskrcnn serve`, apart from the server so that the command line reads their defaults without
importing it (FastAPI, torch)."""

from __future__ import annotations

from dataclasses import dataclass

API_KEY_ENV = "MASKRCNN_API_KEY"  # the API key, when --api-key is not given


@dataclass
class ServeSettings:
    """How the server runs (the options of `maskrcnn serve`)."""

    host: str = "127.0.0.1"  # address to bind; one beyond loopback needs api_key or allow_open
    port: int = 8000  # 0: any free port
    max_batch: int = 8  # most images in one model call
    max_wait_ms: float = 10.0  # longest wait after a batch's first image for more to fill it
    max_queue: int = 32  # most requests waiting for the model; beyond them 503 + Retry-After
    max_bytes: int = 20 * 2**20  # largest request body; beyond it 413
    max_pixels: int = 40_000_000  # largest image (height x width); beyond it 413
    timeout_s: float = 30.0  # a request not answered by then gets 504
    api_key: str | None = None  # required in the X-API-Key header (or Authorization: Bearer) when set
    allow_open: bool = False  # bind beyond loopback without an API key (--no-api-key)
    encode_threads: int = 2  # threads decoding images and encoding detections

"""The `maskrcnn serve` command's parser (cli.py's `build_parser` adds it with `add_serve_parser(sub)`).

Heavy modules (torch, FastAPI, the model) are imported when the command runs, so that `maskrcnn --help` answers at
once.
"""

from __future__ import annotations

import argparse
import math
import os

from maskrcnn.app.serve_settings import API_KEY_ENV, ServeSettings
from maskrcnn.errors import UserError


def _count(text: str) -> int:
    """An integer option of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number of at least 1")
    return int(text)


def _port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: a port is a number from 0 to 65535")
    return int(text)


def _seconds(text: str) -> float:
    """A finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number of at least 0")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from maskrcnn.app.serve import run_server
    except ImportError as error:
        raise UserError(f"maskrcnn serve needs the optional packages of `pip install maskrcnn[serve]` ({error})") \
            from None
    api_key = None if args.no_api_key else (args.api_key or os.environ.get(API_KEY_ENV) or None)
    settings = ServeSettings(host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             max_queue=args.max_queue, max_bytes=args.max_bytes, max_pixels=args.max_pixels,
                             timeout_s=args.timeout, api_key=api_key, allow_open=args.no_api_key)
    print(run_server(args.model, settings, runtime=args.runtime, precision=args.precision, overrides=args.set))
    return 0


def add_serve_parser(sub) -> None:
    """Adds `serve` to the subcommands of `maskrcnn` (the object `add_subparsers` returned)."""
    defaults = ServeSettings()
    serve = sub.add_parser("serve", help="serve a model over HTTP (POST /predict, a page to try it at /)",
                           description="Serve a checkpoint or an exported model over HTTP: POST /predict with an "
                                       "image gives its detections as predictions.json holds them; concurrent "
                                       "requests are batched into one model call. GET / is a page to try it; "
                                       "/health, /info, /metrics (Prometheus). Needs `pip install maskrcnn[serve]`.")
    serve.add_argument("model", metavar="MODEL",
                       help="a .pt file written by `maskrcnn train`, or a .onnx / .pt2 file from `maskrcnn export`")
    serve.add_argument("--host", default=defaults.host,
                       help=f"address to listen on (default: {defaults.host}, this machine only); any other needs "
                            f"--api-key or --no-api-key")
    serve.add_argument("--port", type=_port, default=defaults.port, help=f"TCP port (default: {defaults.port})")
    key = serve.add_mutually_exclusive_group()
    key.add_argument("--api-key", metavar="KEY",
                     help=f"require KEY in the X-API-Key header of every request but / and /health (default: "
                          f"${API_KEY_ENV} when set)")
    key.add_argument("--no-api-key", action="store_true",
                     help="serve without a key, also on an address open to the network")
    serve.add_argument("--max-batch", type=_count, default=defaults.max_batch, metavar="N",
                       help=f"most images in one model call (default: {defaults.max_batch})")
    serve.add_argument("--max-wait-ms", type=_seconds, default=defaults.max_wait_ms, metavar="MS",
                       help=f"longest wait after a request for others to batch with it (default: "
                            f"{defaults.max_wait_ms:g})")
    serve.add_argument("--max-queue", type=_count, default=defaults.max_queue, metavar="N",
                       help=f"most requests waiting for the model; more get 503 with Retry-After (default: "
                            f"{defaults.max_queue})")
    serve.add_argument("--max-bytes", type=_count, default=defaults.max_bytes, metavar="N",
                       help=f"largest request body in bytes; larger gets 413 (default: {defaults.max_bytes})")
    serve.add_argument("--max-pixels", type=_count, default=defaults.max_pixels, metavar="N",
                       help=f"largest image, height x width; larger gets 413 (default: {defaults.max_pixels})")
    serve.add_argument("--timeout", type=_seconds, default=defaults.timeout_s, metavar="S",
                       help=f"seconds a request may take; later gets 504 (default: {defaults.timeout_s:g})")
    serve.add_argument("--runtime", metavar="NAME",
                       help="runtime of an .onnx file: onnxruntime (default) or openvino")
    serve.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                       help="inference precision (a checkpoint's model.precision; OpenVINO's fp32 or bf16); "
                            "default: the checkpoint's config")
    serve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a value of the checkpoint's config, e.g. --set model.box_head.score_thresh=0.3 "
                            "(repeatable)")
    serve.set_defaults(func=cmd_serve)

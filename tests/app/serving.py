"""A real `maskrcnn serve` in a subprocess on a free loopback port, and plain HTTP to it (urllib: no client
library), shared by the server's tests (test_serve.py) and its page's (test_serve_page.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

START_SECONDS = 120  # import, model load and warm-up on a loaded 2-core machine take 5-15 s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Answer:
    status: int
    headers: Message  # looked up case-insensitively
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path
    api_key: str | None = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 60.0) -> Answer:
        headers = dict(headers or {})
        if self.api_key is not None:
            headers.setdefault("X-API-Key", self.api_key)
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return Answer(response.status, response.headers, response.read())
        except urllib.error.HTTPError as error:
            return Answer(error.code, error.headers, error.read())

    def predict(self, image: bytes, query: str = "score_thresh=0", content_type: str = "image/png") -> Answer:
        return self.request("POST", f"/predict?{query}", image, {"Content-Type": content_type})


@contextmanager
def serving(checkpoint: Path, log: Path, *options: str, api_key: str | None = None):
    """`maskrcnn serve CHECKPOINT --port P --precision fp32 OPTIONS` until /health says ready; stopped (SIGTERM)
    at the end unless the test stopped it. The API key, when given, goes in through its environment variable."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if api_key is not None:
        env["MASKRCNN_API_KEY"] = api_key
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "maskrcnn", "serve", str(checkpoint), "--port", str(port),
                                    "--precision", "fp32", *options], stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(process, f"http://127.0.0.1:{port}", log, api_key)
    try:
        _wait_ready(server)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"the server ended with {server.process.returncode}: {server.log.read_text()}")
        try:
            if server.request("GET", "/health", timeout=5).status == 200:
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server was not ready within {START_SECONDS} s: {server.log.read_text()}")

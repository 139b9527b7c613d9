"""`maskrcnn serve` as a client sees it: the real server in a subprocess (the tiny trained run's last.pt) on a free
loopback port, plain HTTP to it. Its answers are `maskrcnn predict`'s; concurrent requests share model calls; a
full queue, a too-large body or image and a body that is no image are refused with one line, and the server goes
on serving; SIGTERM answers the requests in flight and exits 0.

The module's server waits up to MAX_WAIT_MS for a batch to fill and holds at most 3 waiting requests (fewer than
--max-batch 4): every batch waits the whole MAX_WAIT_MS, so that requests sent together surely share one, and a
4th request sent with 3 others surely finds the queue full.
"""

from __future__ import annotations

import io
import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from serving import serving

pytest.importorskip("fastapi", reason="maskrcnn serve needs the serve extra: pip install 'maskrcnn[serve]'")

import uvicorn  # noqa: E402

from maskrcnn.app.predict import PredictOptions, run_prediction  # noqa: E402
from maskrcnn.app.serve import ModelServer, bind, check_access  # noqa: E402
from maskrcnn.app.serve_settings import ServeSettings  # noqa: E402
from maskrcnn.cli import main  # noqa: E402
from maskrcnn.errors import UserError  # noqa: E402

MAX_WAIT_MS = 800
MAX_BYTES = 100_000
MAX_PIXELS = 5_000  # 64 x 64 = 4096 pixels pass, 80 x 80 = 6400 do not
API_KEY = "test-key-1"


def png(height: int, width: int, seed: int) -> bytes:
    """A noisy image with a bright square and a dark disc, as PNG bytes."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(60, 120, (height, width, 3), dtype=np.uint8)
    pixels[8:24, 8:24] = (230, 220, 40)
    yy, xx = np.mgrid[:height, :width]
    pixels[(yy - height * 0.6) ** 2 + (xx - width * 0.6) ** 2 < (min(height, width) / 6) ** 2] = (20, 30, 200)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serving(tiny_run / "last.pt", log, "--max-batch", "4", "--max-wait-ms", str(MAX_WAIT_MS), "--max-queue",
                 "3", "--max-bytes", str(MAX_BYTES), "--max-pixels", str(MAX_PIXELS), api_key=API_KEY) as running:
        yield running


def batch_counts(server) -> tuple[float, float]:
    """(model calls of one image, model calls) from /metrics' batch-size histogram."""
    text = server.request("GET", "/metrics").body.decode()
    single = re.search(r'^maskrcnn_batch_size_bucket\{le="1\.0"\} (\S+)$', text, re.MULTILINE)
    calls = re.search(r"^maskrcnn_batch_size_count (\S+)$", text, re.MULTILINE)
    return float(single.group(1)), float(calls.group(1))


def test_answers_are_predicts_and_concurrent_requests_share_a_model_call(server, tiny_run, tmp_path):
    images = {"a.png": png(64, 64, 0), "b.png": png(64, 64, 1), "c.png": png(48, 80, 2)}
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    singles_before, calls_before = batch_counts(server)
    with ThreadPoolExecutor(3) as pool:
        answers = dict(zip(images, pool.map(server.predict, images.values())))
    run_prediction(tiny_run / "last.pt", [str(tmp_path / name) for name in images], tmp_path / "pred",
                   options=PredictOptions(score_thresh=0.0, overlays=False, progress=False), precision="fp32")
    predicted = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    names = {1: "circle", 2: "square"}  # the synthetic data's classes
    for name, answer in answers.items():
        assert answer.status == 200, answer.body
        body = answer.json()
        expected = [d for d in predicted if d["file_name"] == str(tmp_path / name)]
        assert len(body["detections"]) == len(expected) > 0
        assert body["image"] == {"height": 48 if name == "c.png" else 64, "width": 80 if name == "c.png" else 64}
        for ours, theirs in zip(body["detections"], expected):
            assert (ours["category_id"], ours["segmentation"]) == (theirs["category_id"], theirs["segmentation"])
            assert ours["category"] == names[ours["category_id"]]
            np.testing.assert_allclose(ours["bbox"], theirs["bbox"], atol=1e-3)
            assert ours["score"] == pytest.approx(theirs["score"], abs=1e-5)
    # a.png and b.png (one size) in one call, c.png (another size) in a call of its own
    assert batch_counts(server) == (singles_before + 1, calls_before + 2)


def test_formats_thresholds_and_multipart(server):
    image = png(64, 64, 0)
    everything = server.predict(image).json()["detections"]
    scores = [d["score"] for d in everything]
    cut = (scores[1] + scores[2]) / 2  # between the 2nd and 3rd best
    kept = server.predict(image, f"score_thresh={cut}&format=none").json()["detections"]
    assert [d["score"] for d in kept] == scores[:2] and all("segmentation" not in d for d in kept)
    best = server.predict(image, "score_thresh=0&max_detections=1&format=polygons").json()["detections"]
    assert len(best) == 1 and best[0]["bbox"] == everything[0]["bbox"]
    x, y, w, h = best[0]["bbox"]
    points = np.array(best[0]["segmentation"][0]).reshape(-1, 2)  # a polygon on the mask's edge, inside its box
    assert (points >= [x - 1, y - 1]).all() and (points <= [x + w + 1, y + h + 1]).all()
    boundary = b"maskrcnn-test-boundary"
    form = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--" + boundary + b"--\r\n")
    multipart = server.predict(form, "score_thresh=0", f"multipart/form-data; boundary={boundary.decode()}")
    assert multipart.status == 200 and multipart.json()["detections"] == everything


def test_a_full_queue_is_answered_503_with_retry_after_then_serving_goes_on(server):
    image = png(64, 64, 0)
    with ThreadPoolExecutor(4) as pool:  # 3 places: the 4th finds them taken (the batch waits MAX_WAIT_MS)
        answers = list(pool.map(lambda _: server.predict(image), range(4)))
    assert sorted(a.status for a in answers) == [200, 200, 200, 503]
    busy = next(a for a in answers if a.status == 503)
    assert int(busy.headers["Retry-After"]) >= 1 and "--max-queue 3" in busy.json()["error"]
    assert server.predict(image).status == 200


@pytest.mark.parametrize("body, content_type, query, status, reason", [
    (b"\x89PNG" + bytes(MAX_BYTES), "image/png", "", 413, "over the limit of 100000 bytes (--max-bytes)"),
    (png(80, 80, 0), "image/png", "", 413, "80 x 80 pixels is over the limit of 5000 pixels (--max-pixels)"),
    (b"hello", "text/plain", "", 415, "Content-Type text/plain is not an image"),
    (b"hello", "image/png", "", 400, "not an image of a known format"),
    (png(64, 64, 0)[:200], "image/png", "", 400, "not a decodable image"),
    (png(64, 64, 0), "image/png", "score_thresh=2", 400, "score_thresh: Input should be less than or equal to 1"),
], ids=["body-too-large", "too-many-pixels", "not-an-image-type", "not-an-image", "truncated", "bad-threshold"])
def test_a_refusal_is_one_line_and_the_server_goes_on(server, body, content_type, query, status, reason):
    answer = server.predict(body, query, content_type)
    assert answer.status == status
    assert reason in answer.json()["error"] and "\n" not in answer.json()["error"]
    assert b"Traceback" not in answer.body
    assert server.predict(png(64, 64, 0)).status == 200


def test_the_api_key_is_required_except_for_the_page_and_health(server):
    for path in ("/info", "/metrics"):
        assert server.request("GET", path, headers={"X-API-Key": "wrong"}).status == 401
    assert server.request("POST", "/predict", png(64, 64, 0), {"X-API-Key": "", "Content-Type": "image/png"}).status == 401
    assert server.request("GET", "/health", headers={"X-API-Key": ""}).status == 200
    assert b"<canvas" in server.request("GET", "/", headers={"X-API-Key": ""}).body
    info = server.request("GET", "/info").json()
    assert info["classes"] == ["circle", "square"] and info["precision"] == "fp32" and info["api_key_required"]


def test_an_address_beyond_loopback_needs_an_api_key_or_no_api_key(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MASKRCNN_API_KEY", raising=False)
    # refused before the model is read (the file does not exist) and before anything listens
    assert main(["serve", str(tmp_path / "missing.pt"), "--host", "0.0.0.0", "--port", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "maskrcnn: error: --host 0.0.0.0: the service would be open to the network; give --api-key KEY (or "
        "$MASKRCNN_API_KEY) to require a key, or --no-api-key to serve without one")
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_access(ServeSettings(host=host))
    with pytest.raises(UserError, match="--host 0.0.0.0: the service would be open to the network; give --api-key"):
        check_access(ServeSettings(host="0.0.0.0"))
    check_access(ServeSettings(host="0.0.0.0", api_key="k"))
    check_access(ServeSettings(host="0.0.0.0", allow_open=True))


def queue_depth(server) -> float:
    text = server.request("GET", "/metrics").body.decode()
    return float(re.search(r"^maskrcnn_queue_depth (\S+)$", text, re.MULTILINE).group(1))


def test_sigterm_answers_the_requests_in_flight_refuses_new_ones_and_exits_0(tiny_run, tmp_path):
    with serving(tiny_run / "last.pt", tmp_path / "serve.log", "--max-wait-ms", "1500") as server:
        with ThreadPoolExecutor(2) as pool:
            in_flight = [pool.submit(server.predict, png(64, 64, seed)) for seed in (0, 1)]
            deadline = time.monotonic() + 10
            while queue_depth(server) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.4)  # uvicorn closes its socket on its next tick (0.1 s)
            with pytest.raises(OSError):
                server.predict(png(64, 64, 2))
            answers = [future.result() for future in in_flight]
        assert server.process.wait(timeout=30) == 0
    assert [a.status for a in answers] == [200, 200] and all(a.json()["detections"] for a in answers)
    assert "serve: stopped" in (tmp_path / "serve.log").read_text()


class WarmingModel:
    """A stand-in for `ServedModel` whose warm-up lasts until `warmed` is set."""

    info = {"model": "warming.pt", "runtime": "none", "precision": "fp32", "classes": ["thing"]}

    def __init__(self) -> None:
        self.warmed = threading.Event()

    def warm_up(self, max_batch: int) -> None:
        assert self.warmed.wait(timeout=30)

    def detect(self, images: list) -> list:
        raise AssertionError("no request may reach the model before it is warmed up")


def get(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_health_is_ready_only_once_the_model_is_warmed_up():
    model = WarmingModel()
    server = ModelServer(model, ServeSettings(port=0))
    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    running = uvicorn.Server(uvicorn.Config(server.app, log_config=None, access_log=False, lifespan="on"))
    thread = threading.Thread(target=running.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        while not running.started:
            time.sleep(0.02)
        status, _, body = get(url + "/health")
        assert (status, json.loads(body)) == (503, {"status": "warming up"})
        status, headers, body = get(url + "/predict", "POST", png(64, 64, 0))
        assert (status, json.loads(body)["error"], headers["retry-after"]) == (
            503, "the model is still warming up", "1")
        assert re.search(r"^maskrcnn_ready 0\.0$", get(url + "/metrics")[2].decode(), re.MULTILINE)
        model.warmed.set()
        deadline = time.monotonic() + 10
        while get(url + "/health")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert json.loads(get(url + "/health")[2]) == {"status": "ready"}
        assert re.search(r"^maskrcnn_ready 1\.0$", get(url + "/metrics")[2].decode(), re.MULTILINE)
    finally:
        model.warmed.set()
        running.should_exit = True
        thread.join(timeout=30)

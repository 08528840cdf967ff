"""``dynrefer serve`` (`dynrefer_hf.serving`): each request's check, and a real server on loopback with the
tiny model: interleaved clients batched together each get exactly their own regions (the pipeline called alone
on their image), bad requests get their 4xx while the server keeps serving, a full server answers 503."""

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from io import BytesIO

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import pipeline

from dynrefer_hf.serving import RequestError, ServerSettings, parse_request
from dynrefer_hf.serving.server import DescribeAPI, Segment, _passes

SETTINGS = ServerSettings(model="unused", max_request_regions=4, max_new_tokens=8, max_image_pixels=64 * 64)


def _png(width=48, height=40, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(content):
    return base64.b64encode(content).decode()


IMAGE = _b64(_png())


def test_a_good_request_gives_the_pipeline_input():
    parsed = parse_request({"image": IMAGE, "boxes": [[1, 2, 30, 20]], "controls": "red", "max_new_tokens": 3}, SETTINGS)
    assert parsed["boxes"] == [[1, 2, 30, 20]] and parsed["controls"] == "red" and parsed["max_new_tokens"] == 3
    assert np.array_equal(np.asarray(parsed["image"]), np.asarray(PIL.Image.open(BytesIO(_png())).convert("RGB")))


@pytest.mark.parametrize(
    ("request_body", "status", "reason"),
    [
        ([1, 2], 400, "JSON object"),
        ({"image": "%%%", "boxes": [[1, 2, 3, 4]]}, 400, "base64"),
        ({"image": _b64(b"not an image"), "boxes": [[1, 2, 3, 4]]}, 400, "PNG or JPEG"),
        ({"image": _b64(_png(100, 100)), "boxes": [[1, 2, 3, 4]]}, 413, "over 4096 pixels"),
        ({"image": IMAGE, "boxes": [[1, 2, 3, 4]] * 5}, 413, "5 regions"),
        ({"image": IMAGE, "boxes": []}, 422, "boxes"),
        ({"image": IMAGE, "boxes": [[1, 2, 3]]}, 422, r"boxes\[0\]"),
        ({"image": IMAGE, "boxes": [[100, 100, 120, 130]]}, 422, r"boxes\[0\]"),
        ({"image": IMAGE, "boxes": [[1, 2, 3, 4]], "max_new_tokens": 9}, 422, "max_new_tokens"),
        ({"image": IMAGE, "boxes": [[1, 2, 3, 4]], "controls": [["a"], ["b"]]}, 422, "controls"),
        ({"image": IMAGE, "boxes": [[1, 2, 3, 4]], "colour": "red"}, 422, "colour"),
        ({"image": IMAGE, "url": "http://x", "boxes": [[1, 2, 3, 4]]}, 422, "exactly one"),
        ({"url": "http://127.0.0.1/a.png", "boxes": [[1, 2, 3, 4]]}, 422, "does not fetch"),
    ],
)
def test_a_bad_request_is_refused_with_its_status_and_a_one_line_reason(request_body, status, reason):
    with pytest.raises(RequestError) as caught:
        parse_request(request_body, SETTINGS)
    assert caught.value.status == status
    assert re.search(reason, caught.value.reason) and "\n" not in caught.value.reason


def test_urls_are_http_only_even_when_allowed():
    allowed = ServerSettings(model="unused", allow_urls=True)
    with pytest.raises(RequestError, match="only http:// and https://"):
        parse_request({"url": "file:///etc/passwd", "boxes": [[1, 2, 3, 4]]}, allowed)


def test_an_allowed_url_is_fetched_with_the_size_cap(tmp_path):
    import functools
    import http.server

    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "big.png").write_bytes(_png() + b"\0" * 20_000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as files:
        thread = threading.Thread(target=files.serve_forever, daemon=True)
        thread.start()
        try:
            base = f"http://127.0.0.1:{files.server_address[1]}"
            allowed = ServerSettings(model="unused", allow_urls=True, max_body_bytes=20_000)
            parsed = parse_request({"url": f"{base}/a.png", "boxes": [[1, 2, 30, 20]]}, allowed)
            assert np.array_equal(np.asarray(parsed["image"]), np.asarray(PIL.Image.open(tmp_path / "a.png").convert("RGB")))
            with pytest.raises(RequestError, match="over 20000 bytes") as caught:
                parse_request({"url": f"{base}/big.png", "boxes": [[1, 2, 3, 4]]}, allowed)
            assert caught.value.status == 413
            with pytest.raises(RequestError, match="could not fetch") as caught:
                parse_request({"url": f"{base}/missing.png", "boxes": [[1, 2, 3, 4]]}, allowed)
            assert caught.value.status == 422
        finally:
            files.shutdown()


def test_passes_pack_regions_of_several_requests_split_them_and_group_by_generation_length():
    items = [(i, {"boxes": [[0, 0, 1, 1]] * n, "max_new_tokens": t}) for i, (n, t) in enumerate([(3, None), (2, None), (1, 5), (1, None), (6, 5)])]
    passes = _passes(items, max_regions=4)
    assert passes == [
        [Segment(0, 0, 3), Segment(1, 0, 1)],
        [Segment(1, 1, 2), Segment(3, 0, 1)],
        [Segment(2, 0, 1), Segment(4, 0, 3)],
        [Segment(4, 3, 6)],
    ]
    for segments in passes:
        assert sum(segment.stop - segment.start for segment in segments) <= 4
        assert len({items[segment.position][1]["max_new_tokens"] for segment in segments}) == 1


def test_a_batch_packed_into_few_passes_answers_each_request_as_the_pipeline_alone(tiny_region_captioner):
    """The API's predict, without a server: requests of other images, controls and lengths share forward passes
    (one request split between two); each answer equals the pipeline called alone on that request."""
    api = DescribeAPI(ServerSettings(model=str(tiny_region_captioner), device="cpu", dtype="float32", max_batch_regions=4))
    api.setup("cpu")
    bodies = _requests(6)
    parsed = [parse_request(body, ServerSettings(model="unused")) for body in bodies]
    answers = api.predict([*parsed[:2], RequestError(422, "bad"), *parsed[2:]])
    assert isinstance(answers[2], RequestError)
    del answers[2]
    for body, answer in zip(bodies, answers, strict=True):
        _same_regions(answer, _alone(api.describe, body))


# ------------------------------------------------------------------------------------- a real server


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(port, body, timeout=120):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/describe", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


@pytest.fixture(scope="module")
def server(tiny_region_captioner, tmp_path_factory):
    """``dynrefer serve`` on a free loopback port (queue of 6, 300 ms to gather a batch); every process of it is
    killed at the end, whatever happens."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, "-m", "dynrefer_hf.cli", "serve", "--model", str(tiny_region_captioner), "--device", "cpu",
        "--port", str(port), "--dtype", "float32", "--max-wait-ms", "300", "--max-queue", "6", "--max-batch-regions", "16",
    ]  # fmt: skip
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=environment, stdout=output, stderr=output, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not become healthy:\n" + log.read_text()[-3000:]
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response,
            ):
                if response.status == 200:
                    break
            time.sleep(0.5)
        yield port, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _requests(count):
    """Requests whose answers differ: other images, boxes, controls and caption lengths."""
    bodies = []
    for index in range(count):
        body = {"image": _b64(_png(40 + index, 36, seed=index)), "boxes": [[index % 5, 1, 20 + index, 30]] * (1 + index % 3)}
        if index % 2:
            body["controls"] = "blue"
        if index % 3 == 2:
            body["max_new_tokens"] = 3
        bodies.append(body)
    return bodies


def _alone(describe, body):
    """The pipeline called alone on the request's image: the answer the server must give."""
    image = PIL.Image.open(BytesIO(base64.b64decode(body["image"]))).convert("RGB")
    kwargs = {key: body[key] for key in ("controls", "max_new_tokens") if key in body}
    return describe(image, boxes=body["boxes"], **kwargs)


def _same_regions(answer, expected):
    assert len(answer) == len(expected)
    for region, reference in zip(answer, expected):
        assert {key: region[key] for key in ("box", "caption", "tags")} == {key: reference[key] for key in ("box", "caption", "tags")}
        assert region["score"] == pytest.approx(reference["score"], rel=1e-4, abs=1e-6)
        assert [item["name"] for item in region["attributes"]] == [item["name"] for item in reference["attributes"]]


def _concurrently(port, bodies):
    answers = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def client(index):
        start.wait()
        answers[index] = _post(port, bodies[index])

    threads = [threading.Thread(target=client, args=(index,)) for index in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return answers


@pytest.mark.slow
def test_interleaved_clients_are_batched_and_each_gets_its_own_regions(server, tiny_region_captioner):
    port, log = server
    bodies = _requests(5)
    bodies.insert(2, {"image": IMAGE, "boxes": [[1, 2, 3]]})  # a bad request in the same batch
    answers = _concurrently(port, bodies)
    describe = pipeline("region-captioning", model=str(tiny_region_captioner), device="cpu", dtype=torch.float32)
    for body, (status, answer, _) in zip(bodies, answers):
        if body["boxes"] == [[1, 2, 3]]:
            assert status == 422 and "boxes[0]" in answer["detail"]
            continue
        assert status == 200, answer
        _same_regions(answer["regions"], _alone(describe, body))
    batches = [int(size) for size in re.findall(r"batch of (\d+) requests", log.read_text())]
    assert max(batches) > 1, f"no two requests were batched together: {batches}"
    assert _post(port, {"image": "%%", "boxes": [[1, 2, 3, 4]]})[0] == 400  # and it keeps serving
    status, answer, _ = _post(port, bodies[0])
    assert status == 200
    _same_regions(answer["regions"], _alone(describe, bodies[0]))


@pytest.mark.slow
def test_a_full_server_answers_503_with_retry_after_and_loses_nothing(server, tiny_region_captioner):
    port, _ = server
    bodies = _requests(16)
    answers = _concurrently(port, bodies)
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 1 and statuses.count(200) >= 1, statuses
    describe = pipeline("region-captioning", model=str(tiny_region_captioner), device="cpu", dtype=torch.float32)
    for body, (status, answer, headers) in zip(bodies, answers):
        if status == 503:
            assert int(headers["Retry-After"]) >= 1 and "full" in answer["detail"]
        else:
            _same_regions(answer["regions"], _alone(describe, body))

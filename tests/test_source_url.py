"""source-url against a real HTTP server on loopback, which the tests' stack allows
(TILECHAIN_SOURCE_ALLOW_NETWORKS=127.0.0.1/32): images are fetched and decoded; loopback,
private, link-local and metadata targets are refused (directly and through redirects), and so
are oversized bodies, non-images, images over the pixel limit and other schemes, naming the
stage and the param; the stack still serves after each. Without the setting, the same loopback
server is refused (the fetch code in-process, with the service's default settings)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image

from tilechain.client import chain_request
from tilechain.services.core.codecs import encode_image
from tilechain.services.core.config import Settings
from tilechain.services.core.fetch import FetchRefused, fetch
from tilechain.v1 import gateway_pb2

from .conftest import SOURCE_MAX_BYTES, rpc_error, run_events
from .test_bad_input import assert_still_serving

PIXELS = np.random.default_rng(11).integers(0, 256, (48, 80, 3), dtype=np.uint8)
PNG = encode_image(PIXELS, "png")
HUGE_PNG = encode_image(np.zeros((2100, 2100, 1), dtype=np.uint8), "png")  # small file, too many pixels


class Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/chunked-big":  # no Content-Length, more bytes than the limit
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                for _ in range(SOURCE_MAX_BYTES // 65536 + 2):
                    self.wfile.write(b"\0" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the fetch stopped reading at its limit, as it should
            return
        status, headers, body = self.routes.get(path, (404, {"Content-Type": "text/plain"}, b"not here"))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    Handler.routes = {
        "/image.png": (200, {"Content-Type": "image/png"}, PNG),
        "/redirect": (302, {"Location": "/image.png"}, b""),
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/to-private": (301, {"Location": "http://10.1.2.3/image.png"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/big": (200, {"Content-Type": "image/png", "Content-Length": str(SOURCE_MAX_BYTES + 1)}, b""),
        "/text": (200, {"Content-Type": "text/html"}, b"<html></html>"),
        "/huge.png": (200, {"Content-Type": "image/png"}, HUGE_PNG),
    }
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield base
    httpd.shutdown()
    httpd.server_close()


def read_chain(*urls: str) -> dict:
    return {"stages": [
        {"name": "get", "type": "source-url", "params": {"urls": list(urls)}},
        {"name": "save", "type": "persist-disk", "params": {"filename": "from-url/{job}-{index}.png"}},
    ]}


def test_source_url_fetches_images(gateway, server: str, output_root: Path) -> None:
    status = run_events(gateway, chain_request(read_chain(f"{server}/image.png", f"{server}/redirect")))[-1].status
    assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED, status.message
    assert len(status.artifacts) == 2
    for artifact in status.artifacts:
        assert np.array_equal(np.asarray(Image.open(output_root / artifact.path)), PIXELS)


@pytest.mark.parametrize(
    ("url", "code", "words"),
    [
        ("http://127.0.0.2:9/image.png", grpc.StatusCode.INVALID_ARGUMENT, ["resolves to 127.0.0.2", "loopback, private, link-local and metadata"]),
        ("http://10.1.2.3/image.png", grpc.StatusCode.INVALID_ARGUMENT, ["resolves to 10.1.2.3"]),
        ("http://169.254.169.254/latest/meta-data/", grpc.StatusCode.INVALID_ARGUMENT, ["resolves to 169.254.169.254"]),
        ("http://[::1]:9/image.png", grpc.StatusCode.INVALID_ARGUMENT, ["resolves to ::1"]),
        ("http://[::ffff:169.254.169.254]/", grpc.StatusCode.INVALID_ARGUMENT, ["resolves to ::ffff:169.254.169.254"]),
        ("{server}/to-metadata", grpc.StatusCode.INVALID_ARGUMENT, ["resolves to 169.254.169.254"]),
        ("{server}/to-private", grpc.StatusCode.INVALID_ARGUMENT, ["resolves to 10.1.2.3"]),
        ("{server}/loop", grpc.StatusCode.INVALID_ARGUMENT, ["more than 5 redirects"]),
        ("{server}/big", grpc.StatusCode.INVALID_ARGUMENT, [f"is {SOURCE_MAX_BYTES + 1} bytes, over the limit", "TILECHAIN_SOURCE_MAX_BYTES"]),
        ("{server}/text", grpc.StatusCode.INVALID_ARGUMENT, ["is text/html, not an image"]),
        ("{server}/huge.png", grpc.StatusCode.INVALID_ARGUMENT, ["is 2100x2100, over the limit", "TILECHAIN_MAX_PIXELS"]),
        ("{server}/missing.png", grpc.StatusCode.INVALID_ARGUMENT, ["answered 404"]),
        ("file:///etc/passwd", grpc.StatusCode.INVALID_ARGUMENT, ["only http and https URLs are fetched"]),
        ("http://user:secret@127.0.0.1/image.png", grpc.StatusCode.INVALID_ARGUMENT, ["credentials in a URL are not sent"]),
    ],
    ids=["loopback", "private", "metadata", "ipv6 loopback", "mapped metadata", "redirect to metadata", "redirect to private",
         "redirect loop", "oversized body", "not an image", "too many pixels", "not found", "file scheme", "credentials"],
)
def test_source_url_refusals(url: str, code: grpc.StatusCode, words: list[str], gateway, server: str) -> None:
    error = rpc_error(gateway, chain_request(read_chain(url.format(server=server))))
    assert error.code() == code, error.details()
    assert "stage 'get' (source-url): param 'urls'" in error.details()
    for word in words:
        assert word in error.details()
    assert_still_serving(gateway)


def test_a_body_without_length_is_cut_at_the_limit(server: str) -> None:
    """A streamed answer with no Content-Length is read up to the limit, then refused."""
    with pytest.raises(FetchRefused, match="over the limit"):
        fetch(f"{server}/chunked-big", max_bytes=SOURCE_MAX_BYTES, timeout=30, allow_networks=["127.0.0.1/32"])
    assert fetch(f"{server}/chunked-big", max_bytes=SOURCE_MAX_BYTES, timeout=30, allow_networks=["127.0.0.1/32"], first_bytes=1000).data == b"\0" * 1000


def test_loopback_is_refused_without_the_setting(server: str) -> None:
    """The service's default settings allow public addresses only: the tests' own server is refused."""
    settings = Settings()
    assert settings.source_allow_networks == ()
    with pytest.raises(FetchRefused, match="resolves to 127.0.0.1"):
        fetch(f"{server}/image.png", max_bytes=settings.source_max_bytes, timeout=settings.source_timeout, allow_networks=settings.source_allow_networks)
    with pytest.raises(FetchRefused, match=r"'localhost' resolves to .*(127\.0\.0\.1|::1)"):
        fetch(server.replace("127.0.0.1", "localhost") + "/image.png", max_bytes=1000, timeout=5)
    assert fetch(f"{server}/image.png", max_bytes=len(PNG), timeout=30, allow_networks=["127.0.0.0/8"]).data == PNG

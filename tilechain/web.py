"""The web component: serves the web page (web/static), the example chains, the output root
read-only under /outputs/, and passes the page's gRPC-Web calls on to Envoy, so that the page and
the API share one origin (no CORS).

    python -m tilechain.web [--address HOST:PORT] [--envoy-address HOST:PORT] [--output-root DIR]

Every request to /tilechain.v1.Gateway/<Method> goes to Envoy unchanged, its answer streams back
as Envoy sends it (gRPC-Web carries its trailers in the body, so plain HTTP/1.1 chunks do);
Envoy turns it into gRPC for the gateway. Everything else is a GET (or HEAD) of a file."""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import mimetypes
import os
import signal
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from tilechain.envoy import split_address
from tilechain.services.core.config import DEFAULT_PORTS, GATEWAY_MAX_REQUEST_BYTES, Settings, address_env, default_address
from tilechain.services.core.server import setup_logging

log = logging.getLogger("tilechain.web")

API_PREFIX = "/tilechain.v1.Gateway/"
OUTPUTS_PREFIX = "/outputs/"
EXAMPLES_ENV = "TILECHAIN_WEB_EXAMPLES"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXAMPLES = ROOT / "examples" / "chains"  # in a checkout; an installed package has none
CHUNK_BYTES = 256 * 1024
# hop-by-hop headers (RFC 9110 7.6.1) and the ones this proxy sets itself
NOT_FORWARDED = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length"}

mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("image/webp", ".webp")


def static_root() -> Path:
    """web/static, installed as the package data of tilechain.webpage."""
    return Path(str(resources.files("tilechain.webpage")))


def page_url(address: str) -> str:
    """The URL a person opens for the page served at `address` ("host:port")."""
    host, port = split_address(address)
    if host in ("0.0.0.0", "::", ""):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def inside(root: Path, relative: str) -> Path | None:
    """The regular file `relative` names under root, or None: no '..', no absolute path, and no
    symlink that leads out of root (checked on the resolved path)."""
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." or "\\" in p or "\0" in p for p in parts):
        return None
    root = root.resolve()
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def example_chains(folder: Path | None) -> list[dict[str, Any]]:
    """[{"name": "noise-upscale", "chain": {...}}, ...] from *.json in folder, by name."""
    if folder is None or not folder.is_dir():
        return []
    examples = []
    for path in sorted(folder.glob("*.json")):
        try:
            examples.append({"name": path.stem, "chain": json.loads(path.read_text())})
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("example %s skipped: %s", path, exc)
    return examples


class WebServer(ThreadingHTTPServer):
    daemon_threads = True  # a stream in flight does not hold up shutdown
    request_queue_size = 64

    def __init__(self, address: str, envoy: str, output_root: Path, examples: Path | None, static: Path | None = None) -> None:
        host, port = split_address(address)
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.envoy = split_address(envoy)
        self.output_root = output_root
        self.examples = examples
        self.static = static or static_root()
        super().__init__((host, port), Handler)


class Handler(BaseHTTPRequestHandler):
    server: WebServer
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked answers for the streams
    server_version = "tilechain-web"

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    # --- files ---------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._get(body=True)

    def do_HEAD(self) -> None:
        self._get(body=False)

    def _get(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        if path.startswith(API_PREFIX):
            return self._error(HTTPStatus.METHOD_NOT_ALLOWED, "the Gateway's methods are POST (gRPC-Web)")
        if path == "/healthz":
            return self._bytes(b"ok\n", "text/plain; charset=utf-8", body)
        if path == "/examples.json":
            data = json.dumps({"examples": example_chains(self.server.examples)}).encode()
            return self._bytes(data, "application/json", body, cache="no-cache")
        if path.startswith(OUTPUTS_PREFIX):
            file = inside(self.server.output_root, path[len(OUTPUTS_PREFIX):])
            return self._file(file, body, cache="no-cache") if file else self._error(HTTPStatus.NOT_FOUND, "no such output file")
        if path in ("/", "/index.html"):
            path = "/index.html"
        file = inside(self.server.static, path)
        if file is None or file.suffix == ".py":
            return self._error(HTTPStatus.NOT_FOUND, f"{path}: not found")
        # the page and its bundle change together: revalidate every time (ETag-less, mtime-based)
        self._file(file, body, cache="no-cache")

    def _file(self, path: Path, body: bool, cache: str) -> None:
        stat = path.stat()
        modified = self.date_time_string(int(stat.st_mtime))
        if self.headers.get("if-modified-since") == modified:
            self.send_response(HTTPStatus.NOT_MODIFIED)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type == "application/json":
            content_type += "; charset=utf-8"
        self.send_response(HTTPStatus.OK)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(stat.st_size))
        self.send_header("last-modified", modified)
        self.send_header("cache-control", cache)
        self.send_header("x-content-type-options", "nosniff")
        self.end_headers()
        if body:
            with path.open("rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    self.wfile.write(chunk)

    def _bytes(self, data: bytes, content_type: str, body: bool, cache: str = "no-store") -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.send_header("cache-control", cache)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: HTTPStatus, message: str) -> None:
        data = f"tilechain web: {message}\n".encode()
        self.send_response(status)
        self.send_header("content-type", "text/plain; charset=utf-8")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    # --- the API, passed on to Envoy -----------------------------------------------------

    def do_POST(self) -> None:
        if not urlsplit(self.path).path.startswith(API_PREFIX):
            return self._error(HTTPStatus.NOT_FOUND, f"POST {self.path}: only {API_PREFIX}<Method> takes POST")
        length = self.headers.get("content-length")
        if length is None or not length.isdigit():
            return self._error(HTTPStatus.LENGTH_REQUIRED, "a request body with content-length")
        if int(length) > GATEWAY_MAX_REQUEST_BYTES:
            self.close_connection = True  # the unread body is still on the connection
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request over {GATEWAY_MAX_REQUEST_BYTES} bytes")
        request = self.rfile.read(int(length))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in NOT_FORWARDED}
        upstream = http.client.HTTPConnection(*self.server.envoy, timeout=None)
        try:
            try:
                upstream.request("POST", self.path, body=request, headers=headers)
                answer = upstream.getresponse()
            except OSError as exc:
                return self._error(HTTPStatus.BAD_GATEWAY, f"Envoy at {self.server.envoy[0]}:{self.server.envoy[1]}: {exc}")
            self.send_response_only(answer.status, answer.reason)
            for key, value in answer.getheaders():
                if key.lower() not in NOT_FORWARDED:
                    self.send_header(key, value)
            known_length = answer.getheader("content-length")
            if known_length is not None:
                self.send_header("content-length", known_length)
            else:
                self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            # each event goes on as soon as it arrives: read1 returns what is there, not a full buffer
            while chunk := answer.read1(CHUNK_BYTES):
                if known_length is not None:
                    self.wfile.write(chunk)
                else:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if known_length is None:
                self.wfile.write(b"0\r\n\r\n")
        except (OSError, http.client.HTTPException) as exc:
            # the page went away (a cancelled fetch): closing the upstream connection resets the
            # stream at Envoy, which cancels the call to the gateway. Or Envoy did, mid-answer:
            # the answer is cut short, which the page's client reports.
            if not isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                log.warning("%s: cut short: %s", self.path, exc)
            self.close_connection = True
        finally:
            upstream.close()


def serve(address: str, envoy: str, output_root: Path, examples: Path | None) -> None:
    server = WebServer(address, envoy, output_root, examples)
    # shutdown() waits for serve_forever, so it runs off the signal handler's thread
    stop = lambda signum, frame: threading.Thread(target=server.shutdown, daemon=True).start()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("serving the web page at %s (API: Envoy at %s; outputs: %s)", page_url(address), envoy, output_root)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tilechain web", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--address", default=default_address("web"),
        help=f"host:port to listen on (env {address_env('web')}, default port {DEFAULT_PORTS['web']})",
    )
    parser.add_argument("--envoy-address", default=default_address("envoy"), help=f"Envoy, where the API calls go (env {address_env('envoy')})")
    parser.add_argument(
        "--output-root", type=Path, default=Settings.from_env().output_root,
        help="served read-only under /outputs/ (env TILECHAIN_OUTPUT_ROOT, default var/outputs)",
    )
    parser.add_argument(
        "--examples", type=Path, default=Path(os.environ.get(EXAMPLES_ENV) or DEFAULT_EXAMPLES),
        help=f"folder of example chains (*.json) the page offers (env {EXAMPLES_ENV}, default examples/chains)",
    )
    parser.add_argument("--print-url", action="store_true", help="print the page's URL and exit")
    args = parser.parse_args(argv)
    if args.print_url:
        print(f"web page: {page_url(args.address)}")
        return
    setup_logging()
    serve(args.address, args.envoy_address, args.output_root.resolve(), args.examples)


if __name__ == "__main__":
    main()

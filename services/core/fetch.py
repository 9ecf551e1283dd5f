"""Fetching an image over http(s) for source-url, without letting a chain reach what the
service can reach and the caller should not (SSRF).

Every request: the URL is http or https without credentials; its host is resolved and every
address it resolves to must be a public one (not loopback, private, link-local, which holds
the cloud metadata services' 169.254.169.254, shared, reserved, multicast or unspecified),
unless the service's TILECHAIN_SOURCE_ALLOW_NETWORKS lists it; the connection goes to the
address that was checked (no second lookup a DNS answer could change); redirects are followed
by hand, at most MAX_REDIRECTS, each checked the same way. The answer must be 2xx with an
image content type, and no larger than the service's limit (Content-Length, then the bytes
read); the whole fetch has a deadline."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urljoin, urlsplit

MAX_REDIRECTS = 5
CHUNK = 64 * 1024
USER_AGENT = "tilechain-source-url"


class FetchRefused(ValueError):
    """The URL or its answer is not one the service fetches (a bad request)."""


class FetchFailed(ConnectionError):
    """The server could not be reached or did not answer in time."""


@dataclass
class Fetched:
    url: str             # after redirects
    content_type: str
    length: int | None   # Content-Length, when the server gave one
    data: bytes


def networks(allowed: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(cidr, strict=False) for cidr in allowed]


def address_allowed(address: str, allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allowed):
        return True
    return ip.is_global and not ip.is_multicast


def resolve(host: str, port: int, allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str:
    """The address to connect to: the host's addresses, every one of them allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchFailed(f"cannot resolve {host!r}: {exc}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    refused = [a for a in addresses if not address_allowed(a, allowed)]
    if refused:
        raise FetchRefused(
            f"{host!r} resolves to {', '.join(refused)}: loopback, private, link-local and metadata "
            "addresses are not fetched (the service's TILECHAIN_SOURCE_ALLOW_NETWORKS can allow networks)"
        )
    return addresses[0]


def _connection(scheme: str, host: str, address: str, port: int, timeout: float) -> http.client.HTTPConnection:
    """A connection to the checked address that speaks to `host` (Host header, TLS SNI and
    certificate name)."""

    class Pinned(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.create_connection((address, port), timeout)

    class PinnedTLS(http.client.HTTPSConnection):
        def connect(self) -> None:
            sock = socket.create_connection((address, port), timeout)
            self.sock = self._context.wrap_socket(sock, server_hostname=host)

    if scheme == "https":
        return PinnedTLS(host, port, timeout=timeout, context=ssl.create_default_context())
    return Pinned(host, port, timeout=timeout)


def fetch(url: str, *, max_bytes: int, timeout: float, allow_networks: Iterable[str] = (), first_bytes: int = 0) -> Fetched:
    """GET an image. first_bytes > 0 reads only that many bytes of the body (the header),
    asking for a range."""
    allowed = networks(allow_networks)
    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise FetchRefused(f"{url!r}: only http and https URLs are fetched")
        if parts.username or parts.password:
            raise FetchRefused(f"{url!r}: credentials in a URL are not sent")
        if not parts.hostname:
            raise FetchRefused(f"{url!r} has no host")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise FetchRefused(f"{url!r} has a bad port") from None
        address = resolve(parts.hostname, port, allowed)
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchFailed(f"{url!r}: no answer within {timeout:.0f}s")
        connection = _connection(parts.scheme, parts.hostname, address, port, left)
        headers = {"User-Agent": USER_AGENT, "Accept": "image/*"}
        if first_bytes:
            headers["Range"] = f"bytes=0-{first_bytes - 1}"
        try:
            connection.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), headers=headers)
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise FetchRefused(f"{url!r}: redirect ({response.status}) without a Location")
                url = urljoin(url, location)
                continue
            return _read(url, response, max_bytes, first_bytes, deadline, timeout)
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, (FetchRefused, FetchFailed)):
                raise
            raise FetchFailed(f"{url!r}: {type(exc).__name__}: {exc}") from None
        finally:
            connection.close()
    raise FetchRefused(f"more than {MAX_REDIRECTS} redirects")


def _read(url: str, response: http.client.HTTPResponse, max_bytes: int, first_bytes: int, deadline: float, timeout: float) -> Fetched:
    if response.status >= 500:
        raise FetchFailed(f"{url!r}: the server answered {response.status} {response.reason}")
    if not 200 <= response.status < 300:
        raise FetchRefused(f"{url!r}: the server answered {response.status} {response.reason}")
    content_type = (response.getheader("Content-Type") or "").split(";", 1)[0].strip().lower()
    if not content_type.startswith("image/"):
        raise FetchRefused(f"{url!r} is {content_type or 'of no content type'}, not an image")
    length_header = response.getheader("Content-Length")
    length = int(length_header) if length_header and length_header.isdigit() else None
    whole = response.status == 200 or not first_bytes  # 206: the range only
    if whole and length is not None and length > max_bytes:
        raise FetchRefused(f"{url!r} is {length} bytes, over the limit of {max_bytes} (TILECHAIN_SOURCE_MAX_BYTES)")
    limit = first_bytes or max_bytes
    data = bytearray()
    while len(data) < limit + 1:
        if time.monotonic() > deadline:
            raise FetchFailed(f"{url!r}: not read within {timeout:.0f}s")
        chunk = response.read(min(CHUNK, limit + 1 - len(data)))
        if not chunk:
            break
        data += chunk
    if first_bytes:
        return Fetched(url, content_type, length, bytes(data[:first_bytes]))
    if len(data) > max_bytes:
        raise FetchRefused(f"{url!r} is over the limit of {max_bytes} bytes (TILECHAIN_SOURCE_MAX_BYTES)")
    return Fetched(url, content_type, length, bytes(data))

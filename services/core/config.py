"""Addresses, ports and limits: one place, each overridable by flag or environment variable."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FAMILIES: tuple[str, ...] = ("source", "blend", "correct", "upscale", "persist", "reduce")

DEFAULT_PORTS: dict[str, int] = {
    "gateway": 50050,
    "source": 50051,
    "blend": 50052,
    "correct": 50053,
    "upscale": 50054,
    "persist": 50055,
    "reduce": 50056,
    "envoy": 8080,
    "s3": 8333,  # the local stack's S3 server (SeaweedFS)
}

# gRPC message limits: transport tiles are at most 4 MiB of pixels; the headroom covers the
# envelope. Requests to the gateway carry attached images, hence its larger limit.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
GATEWAY_MAX_REQUEST_BYTES = 256 * 1024 * 1024


def address_env(component: str) -> str:
    """The environment variable that holds a component's address, e.g. TILECHAIN_UPSCALE_ADDR."""
    return f"TILECHAIN_{component.upper()}_ADDR"


def default_address(component: str) -> str:
    return os.environ.get(address_env(component)) or f"127.0.0.1:{DEFAULT_PORTS[component]}"


def channel_options(max_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]


@dataclass(frozen=True)
class Settings:
    """Limits and paths shared by every service."""

    max_pixels: int = 8192 * 8192          # largest canvas a stage may produce or accept
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
        return cls(
            max_pixels=int(env.get("TILECHAIN_MAX_PIXELS", cls.max_pixels)),
            transport_tile=int(env.get("TILECHAIN_TRANSPORT_TILE", cls.transport_tile)),
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

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
}

# gRPC message limits: transport tiles are at most 4 MiB of pixels; the headroom covers the
# envelope. Requests to the gateway carry attached images, hence its larger limit.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
GATEWAY_MAX_REQUEST_BYTES = 256 * 1024 * 1024


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

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            max_pixels=int(env.get("TILECHAIN_MAX_PIXELS", cls.max_pixels)),
            transport_tile=int(env.get("TILECHAIN_TRANSPORT_TILE", cls.transport_tile)),
            output_root=Path(env.get("TILECHAIN_OUTPUT_ROOT", cls.output_root)).resolve(),
            models_root=Path(env.get("TILECHAIN_MODELS_ROOT", cls.models_root)).resolve(),
            models_config=Path(env.get("TILECHAIN_MODELS_CONFIG", cls.models_config)).resolve(),
        )

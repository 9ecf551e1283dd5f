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
    max_job_pixels: int = 16 * 8192 * 8192  # output pixels of all of a job's stages together
    max_decode_ratio: int = 4096            # decoded bytes per file byte of an attached image
    transport_tile: int = 512               # default transport tile edge
    output_root: Path = Path("var/outputs")  # persist-disk writes only below this
    models_root: Path = Path("var/models")      # models.yaml paths are relative to this
    models_config: Path = Path("models.yaml")

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
        )

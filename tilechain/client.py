"""A small client for the gateway: build a ChainRequest from a chain file and images, run it,
and reassemble returned tiles into images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Union

import grpc
import numpy as np

from tilechain.services.core.codecs import canvas_layout
from tilechain.services.core.config import GATEWAY_MAX_REQUEST_BYTES, channel_options
from tilechain.v1 import gateway_pb2, gateway_pb2_grpc


def load_chain(path: Path) -> str:
    return Path(path).read_text()


def chain_request(
    chain: str | dict[str, Any],
    attachments: list[tuple[str, str, bytes]] = (),
    return_tiles: int = gateway_pb2.TILE_RETURN_NONE,
    transport_tile: int = 0,
    decode_between_stages: bool = False,
) -> gateway_pb2.ChainRequest:
    """chain: JSON text or a dict; attachments: (stage name, "image" or "mask", encoded bytes)."""
    text = chain if isinstance(chain, str) else json.dumps(chain)
    return gateway_pb2.ChainRequest(
        chain_json=text,
        attachments=[gateway_pb2.Attachment(stage=s, role=r, data=d) for s, r, d in attachments],
        return_tiles=return_tiles,
        transport_tile=transport_tile,
        decode_between_stages=decode_between_stages,
    )


CHUNK_BYTES = 1024 * 1024               # of an attachment, per SubmitChainStream message
STREAM_ABOVE_BYTES = 4 * 1024 * 1024    # the CLI uploads attachments larger than this in chunks

Source = Union[bytes, Path]  # an attachment's bytes, or the file that holds them


def upload_messages(
    chain: str | dict[str, Any],
    attachments: list[tuple[str, str, Source]],
    chunk_bytes: int = CHUNK_BYTES,
    **options: Any,
) -> Iterator[gateway_pb2.ChainUpload]:
    """SubmitChainStream's messages: the request with each attachment's stage, role and size,
    then the bytes in chunks (read from the files as they are sent), then the end."""
    request = chain_request(chain, (), **options)
    for stage, role, source in attachments:
        size = source.stat().st_size if isinstance(source, Path) else len(source)
        request.attachments.add(stage=stage, role=role, size=size)
    yield gateway_pb2.ChainUpload(request=request)
    for stage, role, source in attachments:
        offset = 0
        for data in _chunks(source, chunk_bytes):
            yield gateway_pb2.ChainUpload(chunk=gateway_pb2.AttachmentChunk(stage=stage, role=role, offset=offset, data=data))
            offset += len(data)
    yield gateway_pb2.ChainUpload(end=gateway_pb2.UploadEnd())


def _chunks(source: Source, size: int) -> Iterator[bytes]:
    if isinstance(source, bytes):
        for start in range(0, len(source), size):
            yield source[start : start + size]
        return
    with open(source, "rb") as f:
        while data := f.read(size):
            yield data


def submit_stream(
    stub: gateway_pb2_grpc.GatewayStub,
    chain: str | dict[str, Any],
    attachments: list[tuple[str, str, Source]],
    timeout: float | None = None,
    **options: Any,
) -> gateway_pb2.JobRef:
    """Submit a chain with its attachments streamed in chunks (no size limit but the gateway's
    per-file one); WatchJob then follows the job."""
    return stub.SubmitChainStream(upload_messages(chain, attachments, **options), timeout=timeout)


def connect(address: str) -> gateway_pb2_grpc.GatewayStub:
    # replace the default, not append: gRPC takes the first of two equal keys
    options = [o for o in channel_options() if o[0] != "grpc.max_send_message_length"]
    options.append(("grpc.max_send_message_length", GATEWAY_MAX_REQUEST_BYTES))
    return gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(address, options=options))


def run(stub: gateway_pb2_grpc.GatewayStub, request: gateway_pb2.ChainRequest, timeout: float | None = None) -> Iterator[gateway_pb2.JobEvent]:
    return stub.RunChain(request, timeout=timeout)


class TileAssembler:
    """Collects TileEvents into whole images, keyed by (stage name, canvas id)."""

    def __init__(self) -> None:
        self.images: dict[tuple[str, int], np.ndarray] = {}

    def add(self, event: gateway_pb2.TileEvent) -> None:
        canvas, tile = event.canvas, event.tile
        key = (event.name, canvas.id)
        chans, dtype = canvas_layout(canvas)
        if key not in self.images:
            self.images[key] = np.zeros((canvas.height, canvas.width, chans), dtype=dtype)
        region = np.frombuffer(tile.pixels, dtype=dtype).reshape(tile.height, tile.width, chans)
        self.images[key][tile.y : tile.y + tile.height, tile.x : tile.x + tile.width] = region

"""SubmitChainStream: a chain whose attachments arrive as a stream of chunks, for files larger
than one request message may be. The chain is checked on the first message, each file's header
as soon as its first bytes are in, so a bad request is refused before its upload has been sent."""

from __future__ import annotations

import logging
from typing import AsyncIterator

from tilechain.services.core.config import MAX_UPLOAD_BYTES, Settings
from tilechain.v1 import gateway_pb2

from .chain import ATTACHMENT_PREFIXES, attachment_target, check_stages, checked_header, invalid
from .families import Family

log = logging.getLogger("tilechain.gateway")

HEADER_BYTES = 64 * 1024  # enough of a file for its header: check it once this much is in


async def receive_upload(
    messages: AsyncIterator[gateway_pb2.ChainUpload], families: dict[str, Family], settings: Settings
) -> tuple[gateway_pb2.ChainRequest, list[bytearray]]:
    """The ChainRequest and its attachments' bytes (in the order of request.attachments), put
    together from their chunks. The bytes stay out of the request message: each copy of a
    large file costs its size, and the plan needs one."""
    first = await anext(aiter(messages), None)
    if first is None or first.WhichOneof("kind") != "request":
        raise invalid("SubmitChainStream: the first message must be the request")
    request = first.request
    stages, specs = await check_stages(request, families)
    by_name = {s.name: s for s in stages}
    expected: dict[tuple[str, str], int] = {}
    for number, attachment in enumerate(request.attachments):
        stage, role, _ = attachment_target(number, attachment.stage, attachment.role, by_name, specs)
        if attachment.data:
            raise invalid(f"{stage.label}: attached {role}: with SubmitChainStream its bytes come as chunks; leave data empty and give size")
        if (stage.name, role) in expected:
            raise invalid(f"{stage.label}: more than one {role} attached")
        if not 0 < attachment.size <= MAX_UPLOAD_BYTES:
            raise invalid(f"{stage.label}: attached {role}: size {attachment.size} is not 1..{MAX_UPLOAD_BYTES} bytes")
        expected[(stage.name, role)] = attachment.size

    received = {key: bytearray(size) for key, size in expected.items()}  # filled in place, no regrowth
    filled = dict.fromkeys(expected, 0)
    checked: set[tuple[str, str]] = set()
    ended = False
    chunks = 0
    async for message in messages:
        kind = message.WhichOneof("kind")
        if kind == "end":
            ended = True
            break
        if kind != "chunk":
            raise invalid(f"SubmitChainStream: a {kind} message after the first; send chunks, then the end")
        chunk = message.chunk
        prefix, sep, rest = chunk.stage.partition(":")  # onnx-web's source:<stage>, mask:<stage>
        if sep and prefix in ATTACHMENT_PREFIXES and rest in by_name:
            key = (rest, chunk.role or ATTACHMENT_PREFIXES[prefix])
        else:
            key = (chunk.stage, chunk.role or "image")
        if key not in received:
            raise invalid(f"SubmitChainStream: a chunk for {key[1]} of stage {chunk.stage[:128]!r}, which the request did not declare")
        label = by_name[key[0]].label
        start, size = filled[key], len(chunk.data)
        if chunk.offset != start:
            raise invalid(f"{label}: attached {key[1]}: a chunk at offset {chunk.offset}, expected {start} (send chunks in order)")
        if start + size > expected[key]:
            raise invalid(f"{label}: attached {key[1]}: more bytes than its declared size {expected[key]}")
        data = received[key]
        data[start : start + size] = chunk.data
        filled[key] = start + size
        chunks += 1
        complete = filled[key] == expected[key]
        if key not in checked and (filled[key] >= HEADER_BYTES or complete):
            # a header longer than HEADER_BYTES (big EXIF or ICC blocks) is checked when complete
            prefix = bytes(data[: filled[key] if complete else HEADER_BYTES])
            if checked_header(by_name[key[0]], key[1], prefix, expected[key], settings, partial=not complete):
                checked.add(key)
    if not ended:
        raise invalid("SubmitChainStream: the stream ended without its end message")
    for (name, role), size in filled.items():
        if size != expected[(name, role)]:
            raise invalid(f"{by_name[name].label}: attached {role}: {size} bytes arrived of the {expected[(name, role)]} declared")
    log.info("SubmitChainStream: %d attachment(s), %d bytes in %d chunks", len(expected), sum(expected.values()), chunks)
    # the bytearrays themselves: the decode reads them in place (a bytes copy would double them)
    return request, [received[(a.stage, a.role or "image")] for a in request.attachments]

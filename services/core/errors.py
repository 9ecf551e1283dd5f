"""What a client sees of a failure. Every message that leaves a process goes through
public_text: no Python object reprs, no server paths (files under the output or models root
are named relative to it, other server paths by their last component). An exception nobody
expected becomes INTERNAL with internal_message: where it happened and the exception's short
type name; the traceback goes to the log, never to the client."""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable

import grpc
from google.protobuf.message import DecodeError

log = logging.getLogger("tilechain.errors")

MAX_MESSAGE_CHARS = 2000

_REPR = re.compile(r"<(?:[\w.]+\.)?(\w+)(?: object)? at 0x[0-9a-fA-F]+>")  # <_io.BytesIO object at 0x7f..>
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/[^\s'\"<>:,;()\[\]{}]+")


def _server_roots() -> list[str]:
    """Folders whose paths say something about the server and nothing to a client."""
    roots = {sys.prefix, sys.base_prefix, os.getcwd(), str(Path.home()), str(Path(__file__).resolve().parents[2])}
    return sorted((r.rstrip("/") + "/" for r in roots if r and r != "/"), key=len, reverse=True)


_SERVER_ROOTS = _server_roots()


def public_text(text: str, roots: Iterable[Path] = (), every_path: bool = False) -> str:
    """text as a client may see it. roots (the output and models roots): paths under them
    become relative to them. Paths under the server's install, home or working folder become
    their last component; with every_path, so does any other absolute path (for the text of
    an unexpected exception, which may name anything)."""
    text = _REPR.sub(lambda m: f"<{m.group(1)}>", text)
    text = _ADDRESS.sub("", text)
    relative_to = sorted((str(r).rstrip("/") + "/" for r in roots), key=len, reverse=True)

    def shorten(match: re.Match[str]) -> str:
        path = match.group(0)
        for root in relative_to:
            if path.startswith(root) or path + "/" == root:
                return path[len(root):] or "."
        if every_path or any(path.startswith(root) for root in _SERVER_ROOTS):
            return path.rstrip("/").rsplit("/", 1)[-1] or path
        return path

    text = _ABSOLUTE_PATH.sub(shorten, text)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def internal_message(where: str, exc: BaseException, roots: Iterable[Path] = ()) -> str:
    """INTERNAL's message for an exception nobody expected."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    detail = public_text(first_line, roots, every_path=True)[:300]
    return f"{where}: internal error ({type(exc).__name__}{': ' + detail if detail else ''}); the traceback is in the server's log"


# --- the last line of defence: a server interceptor ------------------------------------------


async def abort_unless_gone(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End the call with this status (raises AbortError), unless its caller has gone: then it
    returns. Gone is cancelled, or a status gRPC can no longer send (a cancel that crossed the
    error: a stream's input stops short before the call reads as cancelled)."""
    if context.cancelled():
        return
    try:
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise
    except Exception:  # ExecuteBatchError, "Abort already called": the call had ended
        return


class _Undecodable:
    """Stands for a request message that did not parse (e.g. a Struct nested past protobuf's
    depth limit): the handler refuses it with INVALID_ARGUMENT instead of gRPC's bare error."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, RecursionError, ValueError) as exc:
            reason = "nested too deeply" if "Depth" in str(exc) or isinstance(exc, RecursionError) else "malformed"
            return _Undecodable(reason)

    return deserialize


async def _refuse_undecodable(message: Any, method: str, context: grpc.aio.ServicerContext) -> None:
    if isinstance(message, _Undecodable):
        name = method.rsplit("/", 1)[-1]
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: the request message is {message.reason} (not a valid protobuf message)")


async def _checked(requests: AsyncIterator[Any], method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async for message in requests:
        await _refuse_undecodable(message, method, context)
        yield message


class InternalErrors(grpc.aio.ServerInterceptor):
    """Turns any exception a handler lets escape into INTERNAL with internal_message (gRPC
    would send UNKNOWN with the exception's text), and requests that do not parse into
    INVALID_ARGUMENT. Handlers still refuse bad input themselves, with better messages."""

    def __init__(self, component: str, roots: Iterable[Path] = ()) -> None:
        self.component = component  # "gateway", "persist service", ...
        self.roots = list(roots)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.startswith("/tilechain."):  # health, reflection: gRPC's own
            return handler
        where = f"{self.component} ({method.rsplit('/', 1)[-1]})"

        async def fail(exc: Exception, context: grpc.aio.ServicerContext) -> None:
            if context.cancelled():  # the caller is gone: nobody to answer (abort would raise)
                log.info("%s: the caller cancelled (%s)", method, type(exc).__name__)
                return
            log.error("%s failed", method, exc_info=exc)
            await abort_unless_gone(context, grpc.StatusCode.INTERNAL, internal_message(where, exc, self.roots))
            log.info("%s: the caller had gone; no status sent", method)

        async def checked(request, context):
            """The request, checked: a stream's messages as they are read, one message now."""
            if handler.request_streaming:
                return _checked(request, method, context)
            await _refuse_undecodable(request, method, context)
            return request

        def unary_response(behavior):
            async def call(request, context):
                try:
                    return await behavior(await checked(request, context), context)
                except Exception as exc:
                    if isinstance(exc, grpc.aio.AbortError):
                        raise
                    await fail(exc, context)
            return call

        def stream_response(behavior):
            async def call(request, context):
                try:
                    request = await checked(request, context)
                    if inspect.isasyncgenfunction(behavior):
                        responses = behavior(request, context)
                        try:
                            async for response in responses:
                                yield response
                        finally:  # the caller went away: close the handler now, not when collected
                            await responses.aclose()
                    else:
                        await behavior(request, context)
                except Exception as exc:
                    if isinstance(exc, grpc.aio.AbortError):
                        raise
                    await fail(exc, context)
            return call

        kwargs = dict(
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(stream_response(handler.unary_stream), **kwargs)
        return grpc.stream_stream_rpc_method_handler(stream_response(handler.stream_stream), **kwargs)

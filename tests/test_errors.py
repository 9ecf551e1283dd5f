"""UNKNOWN never reaches a client: an exception nobody expected becomes INTERNAL naming where it
happened and the exception's type, with no object reprs and no server paths (the traceback
goes to the log); messages that name models or files name them by model name or by their path
under the models or output root."""

from __future__ import annotations

import asyncio
import io
import logging
import sys
from pathlib import Path

import grpc
import pytest

from tilechain.client import chain_request
from tilechain.services.core.errors import InternalErrors, public_text
from tilechain.v1 import stage_pb2, stage_pb2_grpc

from .conftest import ROOT, free_port, rpc_error

SECRET = "/srv/tilechain/private/stage_code.py"


class Broken(stage_pb2_grpc.StageServicer):
    """A servicer with bugs: every call raises with a repr and a server path in its text."""

    async def Describe(self, request, context):
        raise RuntimeError(f"cannot describe {io.BytesIO()} from {SECRET}")

    async def Process(self, request_iterator, context):
        async for _ in request_iterator:
            yield stage_pb2.StageOutput(progress=stage_pb2.Progress(unit="tiles", done=1, total=2))
            raise KeyError(f"<tilechain.Thing object at 0x7f00deadbeef> in {SECRET}")


def test_escaped_exceptions_become_internal_without_internals(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> list[grpc.aio.AioRpcError]:
        server = grpc.aio.server(interceptors=[InternalErrors("test service")])
        stage_pb2_grpc.add_StageServicer_to_server(Broken(), server)
        address = f"127.0.0.1:{free_port()}"
        server.add_insecure_port(address)
        await server.start()
        errors = []
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = stage_pb2_grpc.StageStub(channel)
                for call in (
                    lambda: stub.Describe(stage_pb2.DescribeRequest()),
                    lambda: _drain(stub.Process(iter([stage_pb2.StageInput(end=stage_pb2.InputEnd())]))),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call()
                    errors.append(info.value)
        finally:
            await server.stop(None)
        return errors

    with caplog.at_level(logging.ERROR, logger="tilechain.errors"):
        describe, process = asyncio.run(scenario())
    assert describe.code() == grpc.StatusCode.INTERNAL
    assert describe.details().startswith("test service (Describe): internal error (RuntimeError: cannot describe <BytesIO> from stage_code.py)")
    assert process.code() == grpc.StatusCode.INTERNAL
    assert "test service (Process): internal error (KeyError" in process.details()
    for error in (describe, process):
        assert "0x" not in error.details() and "/srv/" not in error.details() and "object at" not in error.details()
    assert SECRET in caplog.text and "Traceback" in caplog.text  # the whole story is in the log


async def _drain(call) -> None:
    async for _ in call:
        pass


def test_public_text_keeps_what_the_client_needs() -> None:
    models, outputs = Path("/data/models"), Path("/data/out")
    text = "loading /data/models/upscalers/x.pth failed; /data/out/a/b.png exists; <foo.Bar object at 0xdeadbeef>"
    assert public_text(text, [models, outputs]) == "loading upscalers/x.pth failed; a/b.png exists; <Bar>"
    # the client's own words stay: 4096x4096, 1/2, '/tmp/escape.png' it asked for
    assert public_text("4096x4096 is 1/2 of '/tmp/escape.png'") == "4096x4096 is 1/2 of '/tmp/escape.png'"
    assert public_text(f"in {ROOT}/services/x.py", every_path=True) == "in x.py"


@pytest.mark.parametrize("stage", [
    {"name": "big", "type": "upscale-spandrel", "params": {"model": "loras/tiny-sd15-style.safetensors"}},
    {"name": "refine", "type": "blend-img2img", "params": {"model": "upscalers", "steps": 2}},
])
def test_model_errors_name_the_model_not_the_server_path(gateway, stage: dict) -> None:
    chain = {"stages": [{"name": "noise", "type": "source-noise", "params": {"width": 64, "height": 64}}, stage]}
    error = rpc_error(gateway, chain_request(chain))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert f"stage '{stage['name']}' ({stage['type']}): param 'model'" in error.details()
    assert str(ROOT) not in error.details() and "var/models" not in error.details(), error.details()
    assert "0x" not in error.details()


def test_a_send_to_a_call_that_has_ended_is_one_info_line() -> None:
    """What gRPC's asyncio server logs when a response meets a call the caller already
    cancelled (its own ERROR with a traceback) becomes one INFO line; other errors of that
    logger stay as they are."""
    from grpc._cython.cygrpc import ExecuteBatchError

    from tilechain.services.core.server import EndedCallSend

    def logged(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            record = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, __file__, 1, "%s raised in core by servicer method [%s]",
                                       ("ExecuteBatchError", "/tilechain.v1.Stage/Process"), sys.exc_info())
        assert EndedCallSend().filter(record)
        return record

    ended = logged(ExecuteBatchError('Failed "execute_batch"'))
    assert ended.levelno == logging.INFO and ended.exc_info is None
    assert ended.getMessage() == "a response was not sent: the call had ended (ExecuteBatchError raised in core by servicer method [/tilechain.v1.Stage/Process])"
    other = logged(RuntimeError("a bug"))
    assert other.levelno == logging.ERROR and other.exc_info is not None

"""Planning and model loading off the event loop, health while starting up, the per-model
lock of spandrel models and the per-call memory probe: a real servicer behind a real gRPC
server (in a thread of this process, so that the test can hold a model load open)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tilechain.services.core.codecs import tile_message
from tilechain.services.core.config import Settings
from tilechain.services.core.models import ModelRegistry
from tilechain.services.core.server import serve
from tilechain.services.core.servicer import PreloadError, StageServicer, add_stage_servicer
from tilechain.services.core.spandrel_models import CACHE, load_descriptor, model_lock
from tilechain.services.core.stage import Context, load_all
from tilechain.services.core.tiles import Rect
from tilechain.services.core.torch_runtime import device, peak_bytes_of
from tilechain.v1 import stage_pb2, stage_pb2_grpc, tiles_pb2

from .conftest import ROOT, free_port

SETTINGS = Settings(models_root=ROOT / "var" / "models", models_config=ROOT / "models.yaml", output_root=ROOT / "var" / "outputs")
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class Server:
    """serve() for one family, on its own event loop in a thread."""

    def __init__(self, family: str, ready: Callable[[], Any] | None = None) -> None:
        self.servicer = StageServicer(family, SETTINGS)
        self.address = f"127.0.0.1:{free_port()}"
        self.loop = asyncio.new_event_loop()
        self.stopping: asyncio.Event | None = None
        started = threading.Event()

        async def main() -> None:
            self.stopping = asyncio.Event()
            started.set()
            await serve(self.address, lambda server: [add_stage_servicer(self.servicer, server)], ready=ready, stopping=self.stopping)

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True)
        self.thread.start()
        started.wait()
        self.channel = grpc.insecure_channel(self.address)
        self.stub = stage_pb2_grpc.StageStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.status()  # listening (whatever it says)

    def status(self) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=30).status

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)  # type: ignore[union-attr]
        self.thread.join(60)
        self.channel.close()


@pytest.fixture
def upscale_server() -> Iterator[Server]:
    server = Server("upscale")
    yield server
    server.stop()


def start(stage_type: str, params: dict, width: int = 64, height: int = 64) -> stage_pb2.StageStart:
    image = tiles_pb2.Canvas(id=0, width=width, height=height, format=tiles_pb2.PIXEL_FORMAT_RGB8, role=tiles_pb2.CANVAS_ROLE_IMAGE)
    request = stage_pb2.StageStart(job_id="t", name="s", type=stage_type, inputs=[image])
    request.params.update(params)
    return request


def process(stub: stage_pb2_grpc.StageStub, request: stage_pb2.StageStart, pixels: np.ndarray) -> list[stage_pb2.StageOutput]:
    height, width = pixels.shape[:2]

    def messages():
        yield stage_pb2.StageInput(start=request)
        yield stage_pb2.StageInput(tile=tile_message(0, Rect(0, 0, width, height), pixels))
        yield stage_pb2.StageInput(end=stage_pb2.InputEnd())

    return list(stub.Process(messages(), timeout=60))


def test_a_model_loading_for_one_plan_blocks_no_other_stream(upscale_server: Server) -> None:
    """While a Plan waits for its model (here: a load of that model by someone else that the
    test holds open, which the model cache makes every other request wait for), the service
    answers Describe and runs other streams to the end."""
    registry = ModelRegistry(SETTINGS.models_config, SETTINGS.models_root)
    key = (str(registry.resolve("upscalers", "esrgan-x4").path), str(device()), True)  # load_descriptor's key
    CACHE._models.pop(key, None)  # cold, as after start-up
    entered, release = threading.Event(), threading.Event()

    def slow_load() -> Any:
        entered.set()
        release.wait(120)
        import spandrel

        return spandrel.ModelLoader(device()).load_from_file(registry.resolve("upscalers", "esrgan-x4").path).eval()

    with ThreadPoolExecutor(2) as pool:
        loading = pool.submit(CACHE.get, key, slow_load)
        assert entered.wait(60)
        plan = upscale_server.stub.Plan.future(start("upscale-resrgan", {"model": "esrgan-x4", "tile": 64}), timeout=120)
        try:
            catalog = upscale_server.stub.Describe(stage_pb2.DescribeRequest(), timeout=30)
            assert "upscale-resrgan" in {s.type for s in catalog.stages}
            pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
            outputs = process(upscale_server.stub, start("upscale-simple", {"scale": 2, "method": "nearest"}), pixels)
            assert outputs[-1].WhichOneof("kind") == "done"
            assert not plan.done()  # still waiting for its model, and it blocked nothing
        finally:
            release.set()
        assert loading.result(120) is not None
        result = plan.result(120)
    assert (result.outputs[0].width, result.outputs[0].height) == (256, 256)


def test_health_is_not_serving_until_start_up_work_is_done() -> None:
    gate = threading.Event()

    async def preload() -> None:
        await asyncio.to_thread(gate.wait, 120)

    server = Server("reduce", ready=preload)
    try:
        assert server.status() == NOT_SERVING
        # listening meanwhile: the catalog answers
        assert server.stub.Describe(stage_pb2.DescribeRequest(), timeout=30).family == "reduce"
        watch = server.health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == NOT_SERVING
        gate.set()
        assert next(watch).status == SERVING
        watch.cancel()
    finally:
        gate.set()
        server.stop()


def test_preload_loads_what_the_family_takes_and_refuses_unknown_names() -> None:
    upscale = StageServicer("upscale", SETTINGS)
    loaded = upscale.preload(["esrgan-x4", "upscale-resrgan:compact-x4", "gfpgan"])
    # every spandrel stage takes esrgan-x4 (one load, shared); gfpgan is the correct family's
    assert "upscale-resrgan:esrgan-x4" in loaded and "upscale-resrgan:compact-x4" in loaded
    assert not any(name.endswith(":gfpgan") for name in loaded)
    assert not any(name.startswith("upscale-spandrel:compact") for name in loaded)  # qualified: that stage only
    correct = StageServicer("correct", SETTINGS)
    assert correct.preload(["gfpgan"]) == ["correct-gfpgan:gfpgan"]
    with pytest.raises(PreloadError, match="unknown model 'esrgan-x5'"):
        upscale.preload(["esrgan-x5"])


def test_a_face_stage_refuses_another_architecture_by_name() -> None:
    from tilechain.services.core.params import ParamError

    registry = ModelRegistry(SETTINGS.models_config, SETTINGS.models_root)
    stage = load_all()["correct-codeformer"].create("faces", {"model": "gfpgan"}, Context("j", SETTINGS, registry))
    with pytest.raises(ParamError) as caught:
        stage.plan([tiles_pb2.Canvas(id=0, width=64, height=64, format=tiles_pb2.PIXEL_FORMAT_RGB8)])
    assert caught.value.param == "model" and "is a GFPGAN model; correct-codeformer runs CodeFormer models" in caught.value.message


def test_concurrent_streams_never_run_one_model_at_once() -> None:
    """Two stages on one loaded model, run from two threads: the model's forward never has two
    callers at a time (forward hooks on the real module count them)."""
    registry = ModelRegistry(SETTINGS.models_config, SETTINGS.models_root)
    inside = most = 0
    count_lock = threading.Lock()
    model = load_descriptor(registry, "upscalers", "esrgan-x4", True, ("SR",), "test")

    def enter(*_: Any) -> None:
        nonlocal inside, most
        with count_lock:
            inside += 1
            most = max(most, inside)

    def leave(*_: Any) -> None:
        nonlocal inside
        with count_lock:
            inside -= 1

    handles = [model.model.register_forward_pre_hook(enter), model.model.register_forward_hook(leave)]
    try:
        stages = [
            load_all()["upscale-resrgan"].create(f"s{i}", {"tile": 32, "overlap": 8}, Context("j", SETTINGS, registry))
            for i in range(2)
        ]
        for s in stages:
            s.plan([tiles_pb2.Canvas(id=0, width=64, height=64, format=tiles_pb2.PIXEL_FORMAT_RGB8)])
        pixels = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda s: [s._forward(pixels) for _ in range(6)], stages))
    finally:
        for handle in handles:
            handle.remove()
    assert most == 1
    assert all(np.array_equal(r, results[0][0]) for rs in results for r in rs)
    assert model_lock(model) is model_lock(model)


def test_the_memory_probe_measures_its_own_call_without_resetting_shared_peaks(monkeypatch) -> None:
    """peak_bytes_of reads the allocator's level after each submodule and never resets the
    process-wide peak statistics. On this CPU-only machine the level is that of a counter
    standing in for torch.cuda.memory_allocated: each Linear 'allocates' its output."""
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: pytest.fail("reset the shared peak statistics"))
    level = 1000
    net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Linear(64, 16), torch.nn.Linear(16, 4))

    def allocate(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal level
        level += output.numel() * output.element_size()

    for layer in net:
        layer.register_forward_hook(allocate)  # runs before the probe's own hooks
    used = peak_bytes_of(lambda: net(torch.zeros(2, 8)), net, torch.device("cuda"), allocated=lambda: level)
    assert used == (2 * 64 + 2 * 16 + 2 * 4) * 4
    assert peak_bytes_of(lambda: net(torch.zeros(2, 8)), net, torch.device("cpu")) == 0


def test_plan_deadline_and_preload_list_come_from_the_settings(monkeypatch) -> None:
    from tilechain.services.core.config import DEFAULT_PLAN_TIMEOUT, plan_timeout, preload_names

    monkeypatch.delenv("TILECHAIN_PLAN_TIMEOUT", raising=False)
    assert plan_timeout() == DEFAULT_PLAN_TIMEOUT == 120.0
    monkeypatch.setenv("TILECHAIN_PLAN_TIMEOUT", "7.5")
    assert plan_timeout() == 7.5
    monkeypatch.delenv("TILECHAIN_PRELOAD", raising=False)
    assert preload_names(None, ["sd15"]) == ["sd15"]  # models.yaml's list
    monkeypatch.setenv("TILECHAIN_PRELOAD", "esrgan-x4, source-txt2img:sd15")
    assert preload_names(None, ["sd15"]) == ["esrgan-x4", "source-txt2img:sd15"]  # the environment replaces it
    assert preload_names("gfpgan", ["sd15"]) == ["gfpgan"]  # and the flag both
    monkeypatch.setenv("TILECHAIN_PRELOAD", "")
    assert preload_names(None, ["sd15"]) == []

"""The web page in a real browser: Debian's headless Chromium, driven by Playwright, loads the
page from the web component (tilechain.web) in front of the test stack's Envoy, and runs chains
through the generated gRPC-Web client.

Screenshots of the page mid-job and at the end go to a temporary folder; `make screenshots`
(TILECHAIN_UPDATE_SCREENSHOTS=1) writes them to docs/ instead."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tilechain.browser import launch
from tilechain.client import chain_request
from tilechain.services.core.codecs import encode_image
from tilechain.services.core.config import FAMILIES
from tilechain.stack import LOCAL_COMPONENTS, WEB, Stack
from tilechain.v1 import gateway_pb2
from tilechain.web import page_url

from .conftest import ROOT, free_port
from .test_slim import SLIM_PYTHON
from .web_harness import web  # noqa: F401 (a fixture)

SCREENSHOTS_ENV = "TILECHAIN_UPDATE_SCREENSHOTS"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, web: str) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(page_url(web))
    page.wait_for_selector("body[data-ready=true]")
    yield page
    context.close()
    assert not errors, f"errors in the page: {errors}"


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ROOT / "docs" if os.environ.get(SCREENSHOTS_ENV) == "1" else tmp_path_factory.mktemp("screenshots")


def set_chain(page: Page, chain: dict, return_tiles: int = gateway_pb2.TILE_RETURN_FINAL, transport_tile: int = 0) -> None:
    page.fill("#chain-json", json.dumps(chain, indent=2))
    page.select_option("#return-tiles", str(return_tiles))
    page.fill("#transport-tile", str(transport_tile))


def wait_finished(page: Page) -> str:
    """Wait for the job on show to end; its state as the page shows it."""
    page.wait_for_function("window.tilechain.job && window.tilechain.job.finished")
    return page.inner_text("#job-state")


def canvas_pixels(page: Page, stage_index: int) -> np.ndarray:
    """The stage's canvas at full size, read back from the page as a PNG (lossless), as RGB."""
    url = page.evaluate("stage => window.tilechain.painter.imageURL(stage)", stage_index)
    assert url, f"no canvas for stage {stage_index}"
    data = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def artifact_path(page: Page, stage: str) -> str:
    """The persisted file's path below the output root, from the page's download link."""
    href = page.get_attribute(f"#artifacts li[data-stage='{stage}'] a", "href")
    assert href and href.startswith("/outputs/"), href
    return href.removeprefix("/outputs/")


def test_page_shows_the_catalog(page: Page, gateway) -> None:
    assert "stages" in page.inner_text("#connection")
    types = {s.type for c in gateway.ListStages(gateway_pb2.ListStagesRequest(), timeout=10).catalogs for s in c.stages}
    shown = set(page.eval_on_selector_all(".catalog-stage", "entries => entries.map(e => e.dataset.type)"))
    assert shown == types
    # params with their type, range and help, when the stage is opened
    page.click(".catalog-stage[data-type='upscale-simple'] summary code")
    row = page.locator(".catalog-stage[data-type='upscale-simple'] tr[data-param='scale']")
    assert "int, 1..8" in row.inner_text() and "Factor applied" in row.inner_text()
    # the example chains are offered, the model-free one chosen
    assert page.input_value("#example") == "noise-upscale"
    assert json.loads(page.input_value("#chain-json")) == json.loads((ROOT / "examples" / "chains" / "noise-upscale.json").read_text())


def test_tiles_are_painted_as_they_arrive(page: Page, output_root: Path, screenshots: Path) -> None:
    chain = {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": 256, "height": 256, "method": "gaussian", "seed": 42}},
        {"name": "enlarge", "type": "upscale-simple", "params": {"method": "lanczos", "scale": 4}},
        {"name": "save", "type": "persist-disk", "params": {"filename": "web/{job}-{stage}.{ext}"}},
    ]}
    set_chain(page, chain, transport_tile=128)  # 64 tiles of the 1024² result
    page.click("#run")
    assert wait_finished(page) == "SUCCEEDED"

    trace = page.evaluate("window.tilechain.trace")
    [final] = [e for e in trace["events"] if e["kind"] == "final"]
    assert final["state"] == "SUCCEEDED"
    # ordering, not timing: the page painted tiles before the job's final status reached it
    painted_before = [p for p in trace["paints"] if p["seq"] < final["seq"]]
    assert painted_before, trace
    assert sum(p["tiles"] for p in trace["paints"]) == 64
    assert page.evaluate("window.tilechain.painter.tilesSkipped") == 0

    # the final canvas is the persisted image, pixel for pixel
    path = artifact_path(page, "save")
    persisted = np.asarray(Image.open(output_root / path).convert("RGB"))
    assert persisted.shape == (1024, 1024, 3)
    assert np.array_equal(canvas_pixels(page, 2), persisted)
    # and the download link serves that file
    downloaded = page.evaluate(
        """async href => {
            const digest = await crypto.subtle.digest("SHA-256", await (await fetch(href)).arrayBuffer());
            return Array.from(new Uint8Array(digest), b => b.toString(16).padStart(2, "0")).join("");
        }""",
        f"/outputs/{path}",
    )
    assert downloaded == hashlib.sha256((output_root / path).read_bytes()).hexdigest()

    # the progress rows are redrawn in the next animation frame: expect() waits for it
    expect(page.locator("#progress li")).to_have_count(3)
    expect(page.locator("#progress li[data-state='done']")).to_have_count(3)
    tiles = page.locator(".stage-progress[data-stage='1'] .unit[data-unit='tiles']")
    expect(tiles).to_have_attribute("data-done", tiles.get_attribute("data-total"))
    assert int(tiles.get_attribute("data-total")) > 0
    page.screenshot(path=str(screenshots / "web-done.png"))


def test_bad_chain_shows_the_gateways_message_at_the_param(page: Page, gateway) -> None:
    chain = {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": 64, "height": 64}},
        {"name": "big", "type": "upscale-simple", "params": {"scale": 12}},
    ]}
    with pytest.raises(grpc.RpcError) as refused:
        list(gateway.RunChain(chain_request(chain), timeout=30))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = refused.value.details()
    assert message.startswith("stage 'big' (upscale-simple): param 'scale': ")

    set_chain(page, chain)
    page.click("#run")
    assert wait_finished(page) == "REFUSED"
    assert message in page.inner_text("#job-message")
    # the stage cards are redrawn in the next animation frame: expect() waits for it
    card = page.locator(".stage-card[data-stage='big']")
    expect(card).to_have_class(re.compile(r"\bhas-error\b"))
    expect(page.locator(".stage-card[data-stage='noise']")).to_have_class("stage-card")
    expect(card.locator("tr[data-param='scale'] .param-error")).to_have_text(message.split("param 'scale': ", 1)[1])

    # a stage the gateway names by position, and JSON that is not a chain
    set_chain(page, {"stages": [{"type": "source-noise"}]})
    page.click("#run")
    assert wait_finished(page) == "REFUSED"
    card = page.locator(".stage-card[data-index='0']")
    expect(card).to_have_class(re.compile(r"\bhas-error\b"))
    expect(card.locator(".stage-error")).to_have_text("every stage needs a name")
    page.fill("#chain-json", '{"stages": [')
    page.click("#run")
    expect(page.locator("#chain-error")).to_contain_text("not valid JSON")


def test_dropped_image_runs_and_the_job_reopens(page: Page, output_root: Path) -> None:
    pixels = np.random.default_rng(7).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    chain = {"stages": [
        {"name": "photo", "type": "source-image"},
        {"name": "save", "type": "persist-disk", "params": {"filename": "web/{job}-dropped.{ext}"}},
    ]}
    set_chain(page, chain)
    page.wait_for_selector(".stage-card[data-stage='photo'] .drop[data-role='image']")
    # a drop as a person makes it: a DataTransfer holding the file, dropped on the stage
    page.evaluate(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: "image/png"}));
            document.querySelector(".stage-card[data-stage='photo']").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""",
        [base64.b64encode(encode_image(pixels, "png")).decode(), "photo.png"],
    )
    page.wait_for_selector(".stage-card[data-stage='photo'] .drop.filled img")
    page.click("#run")
    assert wait_finished(page) == "SUCCEEDED"
    job_id = page.inner_text("#job-id")
    assert np.array_equal(np.asarray(Image.open(output_root / artifact_path(page, "save"))), pixels)
    assert np.array_equal(canvas_pixels(page, 1), pixels)
    assert page.get_attribute(f"#recent li[data-job='{job_id}'] .badge", "data-state") == "SUCCEEDED"

    # submitted (SubmitChain, then WatchJob), the same chain and image run again as a new job
    page.click("#submit")
    assert wait_finished(page) == "SUCCEEDED"
    submitted = page.inner_text("#job-id")
    assert submitted != job_id
    assert np.array_equal(np.asarray(Image.open(output_root / artifact_path(page, "save"))), pixels)
    assert page.eval_on_selector_all("#recent li", "items => items.map(i => i.dataset.job)")[:2] == [submitted, job_id]

    # reopened by id (the page's address names the job on show): WatchJob replays the history
    assert page.url.endswith(f"#job={submitted}")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert wait_finished(page) == "SUCCEEDED"
    assert page.inner_text("#job-id") == submitted
    expect(page.locator("#progress li[data-state='done']")).to_have_count(2)
    assert page.get_attribute("#canvases img", "src") == f"/outputs/{artifact_path(page, 'save')}"
    assert page.evaluate("window.tilechain.trace.paints.length") == 0  # no tiles replayed
    # an unknown job says so
    page.fill("#job-input", "no-such-job")
    page.click("#open-job button")
    assert wait_finished(page) == "FAILED"
    assert "NotFound" in page.inner_text("#job-message")
    assert page.locator("#recent li[data-job='no-such-job']").count() == 0


def test_cancel_stops_a_long_job(page: Page, gateway, screenshots: Path) -> None:
    # 16 stages: resizes whose tiles are painted, then a 400-step img2img (the job's long part,
    # a progress event per step), then the save; every stage's tiles returned. Within the default
    # stream limits (a chain needing more streams of one family than its limit is refused)
    stages = [{"name": "noise", "type": "source-noise", "params": {"width": 256, "height": 256, "method": "gaussian", "seed": 1}}]
    stages += [{"name": f"up{n}", "type": "upscale-simple", "params": {"scale": 2, "method": "lanczos"}} for n in range(2)]
    stages += [{"name": f"down{n}", "type": "reduce-thumbnail", "params": {"width": 960 - 80 * n, "height": 960 - 80 * n}} for n in range(11)]
    stages.append({"name": "refine", "type": "blend-img2img", "params": {"prompt": "a long job", "steps": 400, "strength": 1.0, "seed": 1}})
    stages.append({"name": "save", "type": "persist-disk", "params": {"filename": "web/{job}-cancelled.{ext}"}})
    assert len(stages) == 16
    set_chain(page, {"stages": stages}, return_tiles=gateway_pb2.TILE_RETURN_ALL, transport_tile=64)
    page.click("#run")
    # the img2img is stepping (its steps bar is up) and earlier stages' tiles are painted
    page.wait_for_selector("#progress li[data-stage='14'] .unit[data-unit='steps']")
    page.wait_for_function("window.tilechain.trace.paints.length > 0")
    assert page.inner_text("#job-state") == "RUNNING"
    expect(page.locator("#progress li")).to_have_count(16)
    page.screenshot(path=str(screenshots / "web-mid-job.png"))
    page.click("#cancel")
    assert wait_finished(page) == "CANCELLED"
    job_id = page.inner_text("#job-id")
    assert gateway.GetJob(gateway_pb2.JobRef(job_id=job_id), timeout=10).state == gateway_pb2.JOB_STATE_CANCELLED
    [final] = [e for e in page.evaluate("window.tilechain.trace.events") if e["kind"] == "final"]
    assert final["state"] == "CANCELLED"
    assert page.locator("#artifacts li").count() == 0


def test_unavailable_stages_are_marked(browser: Browser, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A stack from the slim environment (no model libraries) lists its model stages as
    unavailable: the catalog marks them, and running one shows the gateway's refusal at it."""
    addresses = {c: f"127.0.0.1:{free_port()}" for c in LOCAL_COMPONENTS}
    services = (*FAMILIES, "gateway")  # from the slim environment; Envoy and the web component from this one
    slim = Stack(addresses, tmp_path_factory.mktemp("slim-web-logs"), python=str(SLIM_PYTHON))
    front = Stack(addresses, slim.log_dir)
    try:  # stop() ends whatever start() began, also when a component fails to come up
        slim.start(services, extra_env={"TILECHAIN_OUTPUT_ROOT": str(tmp_path_factory.mktemp("slim-web-outputs"))})
        front.start(("envoy", WEB), extra_env={"TILECHAIN_ENVOY_ADMIN_ADDR": "off"})
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(page_url(addresses[WEB]))
        page.wait_for_selector("body[data-ready=true]")
        expect(page.locator("#connection")).to_contain_text("unavailable here")
        entry = page.locator(".catalog-stage[data-type='source-txt2img']")
        expect(entry).to_have_class(re.compile(r"\bunavailable\b"))
        entry.locator("summary code").click()
        expect(entry.locator(".unavailable-reason")).to_contain_text("torch")
        expect(page.locator(".catalog-stage[data-type='source-noise']")).not_to_have_class(re.compile(r"\bunavailable\b"))

        page.fill("#chain-json", '{"stages": []}')
        entry.locator("button").click()  # "add": appended to the chain, named after its type
        card = page.locator(".stage-card[data-stage='txt2img']")
        expect(card.locator(".badge.unavailable")).to_have_count(1)
        page.click("#run")
        assert wait_finished(page) == "REFUSED"
        expect(card.locator(".stage-error")).to_contain_text("the source service cannot run this stage")
        page.close()
    finally:
        front.stop()
        slim.stop()

"""`make bench`: the web page in headless Chromium (Debian's, through Playwright) while a large
chain's tiles arrive: a 4096x4096 image returned as its final tiles, and a 16-stage chain with
every stage's tiles in the strip. Measures, in the page, how long frames took while the job ran
(the tab must not freeze), the main thread's long tasks (over 50 ms), the JS heap, when the
first tile was painted and when the final status came; checks that the final canvas equals the
persisted PNG.

Prints, and records in bench/RESULTS.md (between the bench-web:begin/end markers).
Run: python bench/bench_web.py [--no-write]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_chain import free_port, machine, publish, results_block  # noqa: E402

from tilechain.browser import launch  # noqa: E402
from tilechain.stack import LOCAL_COMPONENTS, Stack  # noqa: E402
from tilechain.web import page_url  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench-web:begin -->", "<!-- bench-web:end -->"

# Frame times from requestAnimationFrame, long tasks from the PerformanceObserver, the JS heap
# (Chromium's performance.memory with --enable-precise-memory-info), all recorded from page load.
MONITOR = """
window.__frames = {gaps: [], last: 0, longtasks: [], heap: 0};
function tick(t) {
  const f = window.__frames;
  if (f.last) f.gaps.push(t - f.last);
  f.last = t;
  if (performance.memory) f.heap = Math.max(f.heap, performance.memory.usedJSHeapSize);
  requestAnimationFrame(tick);
}
requestAnimationFrame(tick);
new PerformanceObserver(list => { for (const e of list.getEntries()) window.__frames.longtasks.push(e.duration); })
  .observe({entryTypes: ["longtask"]});
"""


def chains() -> list[tuple[str, dict, int, int]]:
    """(name, chain, return_tiles, transport tile)."""
    big = {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": 1024, "height": 1024, "method": "gaussian", "seed": 3}},
        {"name": "x4", "type": "upscale-simple", "params": {"scale": 4, "method": "lanczos"}},
        {"name": "save", "type": "persist-disk", "params": {"filename": "bench-web/{job}-4096.png"}},
    ]}
    sixteen = [{"name": "noise", "type": "source-noise", "params": {"width": 512, "height": 512, "method": "gaussian", "seed": 1}}]
    for n in range(7):
        sixteen.append({"name": f"up{n}", "type": "upscale-simple", "params": {"scale": 2, "method": "lanczos"}})
        sixteen.append({"name": f"down{n}", "type": "reduce-thumbnail", "params": {"width": 512, "height": 512}})
    sixteen.append({"name": "save", "type": "persist-disk", "params": {"filename": "bench-web/{job}-16.png"}})
    return [
        ("4096² final image (TILE_RETURN_FINAL, 512-px tiles)", big, 1, 0),
        ("16 stages, every stage's tiles (TILE_RETURN_ALL, 128-px tiles)", {"stages": sixteen}, 2, 128),
    ]


def run_case(browser, url: str, outputs: Path, chain: dict, return_tiles: int, transport_tile: int) -> dict:
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.set_default_timeout(600_000)
    page.add_init_script(MONITOR)
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    page.fill("#chain-json", json.dumps(chain))
    page.select_option("#return-tiles", str(return_tiles))
    page.fill("#transport-tile", str(transport_tile))
    page.evaluate("window.__frames.gaps = []; window.__frames.longtasks = []")  # from the click on
    start = time.monotonic()
    page.click("#run")
    page.wait_for_function("window.tilechain.job && window.tilechain.job.finished")
    wall = time.monotonic() - start
    page.wait_for_function("window.tilechain.painter.pending === 0")
    r = page.evaluate("""() => {
        const tr = window.tilechain.trace, f = window.__frames;
        const job = tr.events.find(e => e.kind === 'job'), fin = tr.events.find(e => e.kind === 'final');
        return {state: fin.state, paints: tr.paints.length, paints_before: tr.paints.filter(p => p.seq < fin.seq).length,
                tiles: window.tilechain.painter.tilesDrawn, tiles_before: tr.paints.filter(p => p.seq < fin.seq).reduce((a, p) => a + p.tiles, 0),
                skipped: window.tilechain.painter.tilesSkipped, first_paint_ms: tr.paints[0].t - job.t, final_ms: fin.t - job.t,
                gaps: f.gaps, longtasks: f.longtasks, heap: f.heap}
    }""")
    href = page.get_attribute("#artifacts li[data-stage='save'] a", "href")
    stages = len(chain["stages"])
    url_png = page.evaluate("stage => window.tilechain.painter.imageURL(stage)", stages - 1)
    canvas = np.asarray(Image.open(io.BytesIO(base64.b64decode(url_png.split(",", 1)[1]))).convert("RGB"))
    persisted = np.asarray(Image.open(outputs / href.removeprefix("/outputs/")).convert("RGB"))
    r["equal"] = bool(np.array_equal(canvas, persisted))
    r["wall"] = wall
    page.close()
    return r


def report(results: list[tuple[str, dict]], load: tuple[float, float], chromium: str) -> list[str]:
    lines = [
        f"Headless Chromium ({chromium}, software rendering: `--disable-gpu`) through Playwright, viewport 1500x1000, "
        "on the same 2 cores as the whole stack (the services, the gateway, Envoy and the web component), so the browser competes "
        "with the job for the CPU. The page is the committed web/static/app.js. Frame gaps are the times between "
        "requestAnimationFrame callbacks from the click on Run to the final status; a frozen tab shows as one long gap.",
        "",
        "| chain | job (click → final status in the page) | first tile painted after the first event | tiles painted before the final status | frame gaps: median / p95 / max | frames over 50 ms / over 100 ms | long tasks (> 50 ms): count, longest | JS heap peak | final canvas = persisted PNG |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results:
        gaps = np.array(r["gaps"] or [0.0])
        lines.append(
            f"| {name} | {r['wall']:.1f} s ({r['state']}) | {r['first_paint_ms']:.0f} ms | {r['tiles_before']} of {r['tiles']} "
            f"(in {r['paints_before']} paints) | {np.median(gaps):.0f} / {np.percentile(gaps, 95):.0f} / {gaps.max():.0f} ms | "
            f"{int((gaps > 50).sum())} / {int((gaps > 100).sum())} of {len(gaps)} | {len(r['longtasks'])}, "
            f"{max(r['longtasks'], default=0):.0f} ms | {r['heap'] / 2**20:.0f} MiB | {r['equal']} |"
        )
    lines += [
        "",
        f"1-minute load average {load[0]:.2f} at the start, {load[1]:.2f} at the end (this bench alone keeps the "
        "2 cores busy while a job runs; much more means other work shared the machine, and the frame gaps grow with it).",
    ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        tmp_path = Path(tmp)
        outputs = tmp_path / "outputs"
        addresses = {c: f"127.0.0.1:{free_port()}" for c in LOCAL_COMPONENTS}
        stack = Stack(addresses, tmp_path / "logs")
        env = {"TILECHAIN_OUTPUT_ROOT": str(outputs), "TILECHAIN_ENVOY_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
               "TILECHAIN_MODELS_ROOT": str(ROOT / "var" / "models"), "TILECHAIN_MODELS_CONFIG": str(ROOT / "models.yaml"),
               # the 16-stage chain holds 7 upscale-simple streams at once (the default allows 2 per
               # replica, sized for GPU models; a chain needing more is refused)
               "TILECHAIN_UPSCALE_MAX_STREAMS": "8"}
        try:
            stack.start(LOCAL_COMPONENTS, extra_env=env)
            with sync_playwright() as playwright:
                browser = launch(playwright, ("--enable-precise-memory-info",))
                chromium = f"Chromium {browser.version}"
                results = [(name, run_case(browser, page_url(addresses["web"]), outputs, chain, ret, tile)) for name, chain, ret, tile in chains()]
                browser.close()
        finally:
            stack.stop()
    lines = report(results, (load_start, os.getloadavg()[0]), chromium)
    info = machine()
    block = results_block(BEGIN, END, "bench_web.py", info, "no GPU", f"Python {info['python']}",
                          "`make bench` (`python bench/bench_web.py`)", lines, title="The web page while tiles arrive")
    publish(BEGIN, END, block, write=not args.no_write)
    return 0 if all(r["equal"] and r["state"] == "SUCCEEDED" for _, r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

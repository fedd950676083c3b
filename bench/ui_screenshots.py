"""Retake docs/img/*.png: the Prefect UI as a user sees it, from headless Chromium on a real server.

    python bench/ui_screenshots.py [--out /tmp/muse-ui-shots] [--img docs/img]

Needs Debian's `chromium` (`apt-get install -y chromium`). Runs the demo's quick world (48
pictures, `muse.testing.demo`) on a local `prefect server` (flows/demo_ui.py's `start_server`):
the `pipeline` flow with 200 training steps, the metrics line every 10 and all 24 prompts, then a
`data-refresh` that finds nothing new. Takes, at 1280x900:

    ui-training-progress.png   the `training-progress` artifact while training runs
    ui-training-summary.png    the `training-summary` artifact, scrolled to its sample grid
    ui-training-summary-prompts.png  the same, scrolled to its prompts table
    ui-refresh-nothing-new.png the no-op refresh's `download-stats` artifact

The pages are the V2 UI's (`/v2/...`: where a fresh browser at the UI's address lands; the
`View at` links in run logs open the V1 UI, whose copy of the summary goes to `--out` as a check).
Chromium is driven over its DevTools protocol (a websocket), to wait for the page's text and
scroll before each picture; the CLI's `--screenshot` can do neither.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SIZE = (1280, 900)
STEPS, LOG_EVERY = 200, 10


class Browser:
    """One headless Chromium page driven over the DevTools protocol."""

    def __init__(self, size=SIZE):
        from flows.demo_ui import free_port
        from websockets.sync.client import connect

        port = free_port(9333)
        self.profile = tempfile.TemporaryDirectory()
        self.proc = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                      f"--remote-debugging-port={port}", f"--user-data-dir={self.profile.name}",
                                      f"--window-size={size[0]},{size[1]}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2))
                page = next(p for p in pages if p["type"] == "page")
                break
            except (OSError, StopIteration):
                if time.time() > deadline:
                    raise RuntimeError("chromium did not start") from None
                time.sleep(0.5)
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.ids = itertools.count(1)
        self.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                  mobile=False)

    def call(self, method: str, **params) -> dict:
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def shot(self, url: str, path: Path, wait_for: str, scroll_to: str | None = None, timeout: float = 60) -> None:
        """Open `url`, wait until the page shows `wait_for`, scroll the element whose text is
        `scroll_to` to the top, let pictures load, save a PNG."""
        self.call("Page.enable")
        self.call("Page.navigate", url=url)
        deadline = time.time() + timeout
        while not self.js(f"document.body && document.body.innerText.includes({json.dumps(wait_for)})"):
            if time.time() > deadline:  # take it anyway: the picture shows what is wrong
                print(f"ui_screenshots: WARNING {url}: no {wait_for!r} after {timeout} s", flush=True)
                break
            time.sleep(0.5)
        time.sleep(2)  # images and fonts
        if scroll_to:
            self.js(f"""[...document.querySelectorAll('h1,h2,h3')].find(e => e.innerText.trim() === {json.dumps(scroll_to)})
                        ?.scrollIntoView({{block: 'start'}})""")
            time.sleep(1)
        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        if len(png) > 250_000:  # docs/img stays small: 256 colours are plenty for a UI
            from PIL import Image

            buf = io.BytesIO()
            Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(buf, "PNG", optimize=True)
            png = buf.getvalue()
        path.write_bytes(png)
        print(f"ui_screenshots: {path} ({len(png) // 1024} KB)", flush=True)

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(20)
        self.profile.cleanup()


async def latest(key: str):
    """The newest version of artifact `key`, or None."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                            sort=ArtifactSort.CREATED_DESC, limit=1)
    return found[0] if found else None


def run_flow(env: dict, log, flow: str, config: Path, overrides: list[str]) -> subprocess.Popen:
    """`flow` of flows/pipeline.py in its own process, reporting to the server in `env`."""
    code = f"import sys, json; from flows.pipeline import {flow}; {flow}(sys.argv[1], json.loads(sys.argv[2]))"
    return subprocess.Popen([sys.executable, "-c", code, str(config), json.dumps(overrides)], env=env, cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)


def mid_training(browser: Browser, ui: str, pipeline: subprocess.Popen, img: Path) -> None:
    """The progress artifact's page once training is between 25% and 75%."""
    while pipeline.poll() is None:
        art = asyncio.run(latest("training-progress"))
        if art is not None and 25 <= float(art.data) <= 75:
            browser.shot(f"{ui}/v2/artifacts/artifact/{art.id}", img / "ui-training-progress.png", "ETA")
            return
        time.sleep(1)
    raise RuntimeError("the pipeline ended before training was half done")


def summary_and_refresh(browser: Browser, ui: str, img: Path, out: Path) -> None:
    """The pictures of the last run's artifacts: the training summary (its samples, its prompts)
    and the refresh's download-stats."""
    summary = asyncio.run(latest("training-summary"))
    for page, path, at in ((f"{ui}/v2/artifacts/artifact/{summary.id}", img / "ui-training-summary.png", "Samples"),
                           (f"{ui}/v2/artifacts/artifact/{summary.id}", img / "ui-training-summary-prompts.png",
                            "Prompts"),
                           (f"{ui}/artifacts/artifact/{summary.id}", out / "v1-training-summary.png", "Samples")):
        browser.shot(page, path, "Prompts", scroll_to=at)
    stats = asyncio.run(latest("download-stats"))
    browser.shot(f"{ui}/v2/artifacts/artifact/{stats.id}", img / "ui-refresh-nothing-new.png", "this run")


def main(argv=None) -> int:
    from flows.demo_ui import free_port, start_server, stop
    from muse.testing import demo
    from muse.testing.imageserver import ImageServer
    from muse.testing.shapes import all_prompts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "muse-ui-shots"))
    ap.add_argument("--img", default=str(REPO / "docs" / "img"))
    ap.add_argument("--again", action="store_true", help="no new runs: retake the summary and refresh pictures "
                    "from --out's server database (the progress picture needs a run)")
    args = ap.parse_args(argv)
    out, img = Path(args.out).resolve(), Path(args.img).resolve()
    img.mkdir(parents=True, exist_ok=True)
    config, images = demo.prepare(out, quick=True)
    overrides = [f"train.max_steps={STEPS}", f"train.log_every={LOG_EVERY}",
                 f"sample.prompts=[{', '.join(all_prompts())}]"]
    home = out / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    with ImageServer(images, port=demo.PORT) as srv, open(out / "server-and-flows.log", "ab") as log:
        demo.write_urls(out, srv.url())
        server, env = start_server(home, free_port(4300), log)
        ui = env["PREFECT_API_URL"].removesuffix("/api")
        os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"]
        browser = Browser()
        pipeline = None
        try:
            if not args.again:
                pipeline = run_flow(env, log, "pipeline_flow", config, overrides)
                mid_training(browser, ui, pipeline, img)
                if pipeline.wait() != 0:
                    raise RuntimeError(f"the pipeline failed; see {log.name}")
                if run_flow(env, log, "data_refresh_flow", config, overrides).wait() != 0:
                    raise RuntimeError(f"the data-refresh failed; see {log.name}")
            summary_and_refresh(browser, ui, img, out)
        finally:
            if pipeline is not None:
                stop(pipeline)
            browser.close()
            stop(server)
    return 0

if __name__ == "__main__":
    sys.exit(main())

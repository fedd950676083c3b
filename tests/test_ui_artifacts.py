"""The `training-summary` and `sample-grid` artifacts as a real Prefect server stores them (issue 30,
item 1): pictures sized to the page, short captions, the prompts in a table of their own, and
full-size files as links a browser opens (gs:// roots) or plain paths, never a broken link (local
roots). (A refresh with nothing new, item 5: tests/test_flows.py, after the pipeline run.)"""

import asyncio
import base64
import io
import os
import re
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.report import DISPLAY, THUMB  # noqa: E402
from flows.train import report_task  # noqa: E402
from muse.checkpoint import write_metrics  # noqa: E402
from muse.config import load_config  # noqa: E402
from muse.sample import make_grid, png_bytes  # noqa: E402
from muse.storage import Storage  # noqa: E402
from muse.testing.shapes import all_prompts, make_world  # noqa: E402

pytestmark = pytest.mark.slow  # Prefect's test harness: ~12 s to start

PROMPTS = all_prompts()  # the demo's 24: their grid label once made a 2,580 px wide column
IMAGE = re.compile(r"!\[([^\]]*)\]\((data:image/(?:png|jpeg);base64,[^)]+)\)")
LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)]+)\)")


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@flow
def summary_flow(config_path: str, samples: list[str]) -> str:
    return report_task(config_path, [], samples)


def a_trained_run(root: str, tmp_path) -> tuple[str, list[str]]:
    """What training and `muse sample` leave under the root: metrics, loss curve, 24 samples + grid."""
    sets = [f"storage.root={root}", f"source.paths=[{tmp_path / 'urls.jsonl'}]", "train.run_name=demo",
            "sample.out=samples/demo.png",
            f"sample.prompts=[{', '.join(PROMPTS)}]"]
    cfg = load_config(None, sets, data={})
    config = tmp_path / "pipeline.yaml"
    config.write_text(cfg.to_yaml())
    storage = Storage.from_config(cfg)
    write_metrics(storage, "demo", [{"step": s, "loss": 5.0 - s / 10, "lr": 1e-3} for s in (10, 20, 30)])
    images = np.stack([img for img, _ in make_world(len(PROMPTS), seed=0)])  # pictures like the demo's
    samples = []
    for i, img in enumerate(images):
        storage.write_bytes(f"samples/demo-{i:03d}.png", png_bytes(img))
        samples.append(storage.url(f"samples/demo-{i:03d}.png"))
    storage.write_bytes("samples/demo-grid.png", png_bytes(make_grid(images, captions=PROMPTS)))
    return str(config), samples + [storage.url("samples/demo-grid.png")]


async def _artifacts(flow_run_id):
    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def picture_size(data_url: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).size


def check_layout(md: str) -> list[tuple[str, str]]:
    """The structure every root shares; returns the links (text, target)."""
    heads = [ln for ln in md.splitlines() if ln.startswith("## ")]
    assert heads == ["## Samples", "## Loss curve", "## Prompts"], heads
    images = IMAGE.findall(md)
    assert len(images) == 2 + len(PROMPTS)  # grid, loss curve, a thumbnail per prompt
    (grid_caption, grid), (loss_caption, loss) = images[:2]
    assert grid_caption == "24 samples of run demo" and loss_caption == "loss of run demo"
    # the 320 px grid enlarged twice (sharp pixels, readable captions); the 600 px loss curve as is
    assert picture_size(grid)[0] == DISPLAY and picture_size(loss)[0] == 600
    assert all(max(picture_size(url)) <= THUMB for _, url in images[2:])
    assert all(len(caption) < 40 for caption, _ in images)  # short captions, no prompt list
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "![sample " in ln]
    assert [r.split(" | ")[1] for r in rows] == PROMPTS  # each prompt once, in a row of its own
    assert max(len(IMAGE.sub("", ln)) for ln in md.splitlines()) < 200  # nothing stretches a column
    assert len(md) < 250_000, len(md)  # a few pictures' worth in Prefect's database
    return LINK.findall(md)


def test_local_root_pictures_on_the_page_and_paths_as_plain_text(harness, tmp_path):
    root = str(tmp_path / "root")
    config, samples = a_trained_run(root, tmp_path)
    state = summary_flow(config, samples, return_state=True)
    arts = asyncio.run(_artifacts(state.state_details.flow_run_id))
    assert [a.key for a in arts] == ["training-summary"]  # no image artifact: a local file has no URL
    md = arts[0].data
    assert check_layout(md) == []  # no link at all: a local path as a link is a 404 in the UI
    assert f"full size: `{root}/samples/demo-grid.png`" in md
    assert f"| `{root}/samples/demo-023.png` |" in md


def test_gcs_root_links_open_the_console_and_the_grid_is_an_image_artifact(harness, gcs_root, tmp_path):
    config, samples = a_trained_run(gcs_root, tmp_path)
    state = summary_flow(config, samples, return_state=True)
    arts = {a.key: a for a in asyncio.run(_artifacts(state.state_details.flow_run_id))}
    assert set(arts) == {"training-summary", "sample-grid"}
    links = check_layout(arts["training-summary"].data)
    assert [text for text, _ in links] == ["demo-grid.png", "loss.png"] + [f"demo-{i:03d}.png" for i in range(24)]
    storage = Storage(gcs_root)
    for text, url in links:  # https://storage.cloud.google.com/BUCKET/PATH of an object that exists
        assert url.startswith("https://storage.cloud.google.com/") and url.endswith("/" + text)
        assert storage.fs.exists(unquote(url.removeprefix("https://storage.cloud.google.com/")))
    # the emulator's anonymous access cannot sign: the console URL, said so
    grid = arts["sample-grid"]
    assert grid.type == "image" and grid.data == links[0][1]
    assert "Google accounts that can read the bucket" in grid.description



def test_thumbnails_stop_after_max_thumbs_and_every_prompt_keeps_its_row(tmp_path):
    """A long prompt list keeps the artifact small: rows for all, thumbnails for the first MAX_THUMBS."""
    from flows.report import MAX_THUMBS, summary_markdown

    prompts = [f"prompt {i} | with a bar" for i in range(MAX_THUMBS + 2)]
    cfg = load_config(None, [f"storage.root={tmp_path}", f"source.paths=[{tmp_path / 'urls.jsonl'}]",
                             "train.run_name=demo"], data={})
    storage = Storage.from_config(cfg)
    img = png_bytes(np.full((16, 16, 3), 200, np.uint8))
    samples = []
    for i in range(len(prompts)):
        storage.write_bytes(f"samples/p-{i:03d}.png", img)
        samples.append(storage.url(f"samples/p-{i:03d}.png"))
    md = summary_markdown(cfg, samples, prompts)
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "with a bar" in ln]
    assert len(rows) == len(prompts) and all("\\| with" in r for r in rows)  # a | in a prompt escaped
    assert sum("![sample " in r for r in rows) == MAX_THUMBS
    assert rows[-1].split(" | ")[2] == "in the grid"

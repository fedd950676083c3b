"""Shared fixtures: a real GCS emulator, quiet threads, offline hub."""

import os

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# as flows/demo.py: the demo subsets train on demo.THREADS threads, which spin 8x slower when the
# shared cores are busy; set before torch loads (the trainers the tests start inherit it)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "20000")  # as flows/demo.py: a short spin before sleeping

import pytest  # noqa: E402

from muse.testing.gcs import GCSEmulator  # noqa: E402


@pytest.fixture(scope="session")
def gcs_emulator():
    """One fake-gcs-server for the session; sets STORAGE_EMULATOR_HOST."""
    with GCSEmulator() as emu:
        yield emu


@pytest.fixture
def gcs_root(gcs_emulator) -> str:
    """A fresh bucket per test: 'gs://b-xxxx/data'."""
    return gcs_emulator.new_root()


@pytest.fixture
def gcs_proxy(gcs_emulator):
    """A fault proxy (muse/testing/gcs_faults.py) in front of the session's emulator, at rate 0
    until a test says otherwise; Storage objects made while it runs go through it."""
    from muse.testing.gcs_faults import GCSFaultProxy

    with GCSFaultProxy(gcs_emulator.url, stall_s=3.0, retry_after_s=0.5) as proxy:
        yield proxy


@pytest.fixture(params=["local", "gcs"])
def any_root(request, tmp_path) -> str:
    """Run a test against a local folder and against the GCS emulator."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("gcs_root")


@pytest.fixture(scope="module")
def demo_subset(tmp_path_factory):
    """The demo's images, tiny encoders and config, with its URL list served on 127.0.0.1."""
    from muse.testing import demo
    from muse.testing.imageserver import ImageServer

    out = tmp_path_factory.mktemp("demo")
    config, images = demo.prepare(out, quick=True)
    with ImageServer(images) as srv:
        demo.write_urls(out, srv.url())
        yield out, config

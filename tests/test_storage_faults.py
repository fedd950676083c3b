"""Storage under the faults real GCS produces: the real fake-gcs-server behind the fault proxy
(muse/testing/gcs_faults.py), through `Storage` and its one retry policy (muse/storage.py)."""

import json
import time

import pytest

from muse.storage import IntegrityError, RetryPolicy, Storage, StorageError
from muse.testing.gcs_faults import MENU

# Fast waits; a try that gets no bytes for 0.5 s fails (the proxy's stalls last 3 s).
FAST = RetryPolicy(retries=4, timeout_s=0.5, deadline_s=30, base_s=0.01, cap_s=0.05)
DATA = bytes(range(256)) * 300  # 76,800 bytes


def _storage(gcs_root, policy=FAST) -> Storage:
    st = Storage(gcs_root, retry=policy)
    st.write_bytes("d/a.bin", DATA)
    return st


def _read(st):
    assert st.read_bytes("d/a.bin") == DATA


def _read_range(st):
    with st.open("d/a.bin") as f:  # a Parquet row group's read: one ranged GET
        f.seek(1000)
        assert f.read(50_000) == DATA[1000:51_000]


def _list(st):
    assert st.list("d") == ["d/a.bin"]


def _upload(st):
    st.write_bytes("d/b.bin", DATA)
    assert st.read_bytes("d/b.bin") == DATA


def _delete(st):
    st.write_bytes("d/gone.bin", b"x")
    st.delete("d/gone.bin")  # a reset after the emulator deleted it: the retry's 404 means done
    assert not st.exists("d/gone.bin")


OPS = {"read": ("read", _read), "read-range": ("read", _read_range), "list": ("list", _list),
       "upload": ("upload", _upload), "delete": ("delete", _delete)}
# A ranged read cannot see a flipped byte (no hash covers a range): Parquet page checksums do.
CASES = [(op, fault) for op, (kind, _) in OPS.items() for fault in MENU[kind]
         if not (op == "read-range" and fault == "flip")]


@pytest.mark.parametrize("op,fault", CASES, ids=[f"{o}-{f}" for o, f in CASES])
def test_each_fault_is_survived(gcs_root, gcs_proxy, op, fault):
    """Two of the same fault in a row on one operation: it still returns the right bytes, and
    the proxy saw exactly the two faulted tries plus the one that worked."""
    kind, run = OPS[op]
    st = _storage(gcs_root)
    gcs_proxy.reset_counts()
    gcs_proxy.fail_always("d/", fault, kind=kind, times=2)
    started = time.monotonic()
    run(st)
    assert gcs_proxy.faults() == {(kind, fault): 2}
    assert time.monotonic() - started < 20  # hang guard: stalls end at the 0.5 s read timeout


def test_retry_after_is_honoured(gcs_root, gcs_proxy):
    """A 503 asking for 1.5 s: the next try waits at least that, although the backoff alone
    would wait under 0.05 s."""
    st = _storage(gcs_root)
    gcs_proxy.retry_after_s = 1.5
    gcs_proxy.fail_always("d/a.bin", "503-retry-after", kind="read", times=1)
    started = time.monotonic()
    _read(st)
    waited = time.monotonic() - started
    assert 1.5 <= waited < 20, waited


def test_permanent_fault_names_the_object_and_gcsfs_does_not_retry_under_it(gcs_root, gcs_proxy):
    """A 503 on every try: a StorageError naming the object after retries + 1 requests exactly
    (gcsfs's own 6-try loop is replaced, not stacked: 5 requests, not 5 x 6)."""
    st = _storage(gcs_root)
    gcs_proxy.reset_counts()
    gcs_proxy.fail_always("d/a.bin", "503", kind="read")
    with pytest.raises(StorageError, match=r"GET gs://b-\w+/data/d/a.bin: failed after 5 tries .*"
                       r"no retries left.*HTTP 503") as err:
        st.read_bytes("d/a.bin")
    assert not isinstance(err.value, IntegrityError)
    assert gcs_proxy.counts() == {"read": 5}
    gcs_proxy.always.clear()
    gcs_proxy.fail_always("d/a.bin", "truncate", kind="read")
    with pytest.raises(IntegrityError, match=r"d/a.bin: failed after 5 tries .*short read: (\d+) bytes of "
                       r"\d+ \(bytes 1000-\d+\)"):
        _read_range(st)  # bytes that kept arriving short are never decoded


def test_deadline_bounds_a_request(gcs_root, gcs_proxy):
    """Retries left but the deadline reached: the request fails then, naming it; a Retry-After
    beyond the deadline fails at once instead of sleeping past it."""
    st = _storage(gcs_root, RetryPolicy(retries=100, timeout_s=0.5, deadline_s=2.0, base_s=0.2, cap_s=0.4))
    gcs_proxy.fail_always("d/a.bin", "503", kind="read")
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"d/a.bin: failed after \d+ tries .*the 2 s deadline is reached"):
        st.read_bytes("d/a.bin")
    assert time.monotonic() - started < 10  # hang guard (2 s deadline, waits of at most 0.4 s)
    gcs_proxy.always.clear()
    gcs_proxy.retry_after_s = 60
    gcs_proxy.fail_always("d/a.bin", "503-retry-after", kind="read")
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"failed after 1 try .*the server asks for 60 s more"):
        st.read_bytes("d/a.bin")
    assert time.monotonic() - started < 10


def test_requests_with_a_precondition_are_not_retried(gcs_root, gcs_proxy):
    """A create-only upload (ifGenerationMatch=0) whose answer was lost could have landed: a retry
    would fail with 412, so the 503 is raised as is after one request."""
    from gcsfs.retry import HttpError

    st = _storage(gcs_root)
    gcs_proxy.reset_counts()
    gcs_proxy.fail_always("d/new.bin", "503", kind="upload", times=1)
    with pytest.raises(HttpError):
        st.fs.pipe_file(st.path("d/new.bin"), DATA, mode="create")
    assert gcs_proxy.counts() == {"upload": 1}


def _workload(st):
    st.write_many({f"w/{i:02d}.bin": DATA[i:] for i in range(12)})
    assert st.list("w") == [f"w/{i:02d}.bin" for i in range(12)]
    assert st.read_many([f"w/{i:02d}.bin" for i in range(12)]) == {f"w/{i:02d}.bin": DATA[i:] for i in range(12)}
    for i in range(0, 12, 3):
        with st.open(f"w/{i:02d}.bin") as f:
            f.seek(500)
            assert f.read(20_000) == DATA[i + 500:i + 20_500]
        assert st.read_bytes(f"w/{i:02d}.bin") == DATA[i:]
    st.delete_many([f"w/{i:02d}.bin" for i in range(6)])
    assert st.sizes("w") == {f"w/{i:02d}.bin": len(DATA) - i for i in range(6, 12)}


def test_request_counts_against_a_fault_free_run(gcs_emulator, gcs_proxy):
    """The same work at 0% and at 20% faults: the faulted run makes exactly one more request per
    fault (each fault costs its one retry), no more: retries do not multiply work. Kinds this
    workload never makes are absent from both counts."""
    _workload(Storage(gcs_emulator.new_root(), retry=FAST))
    clean = gcs_proxy.counts()
    gcs_proxy.reset_counts()
    gcs_proxy.rate, gcs_proxy.seed = 0.2, 7
    _workload(Storage(gcs_emulator.new_root(), retry=FAST))
    faulted, faults = gcs_proxy.counts(), gcs_proxy.faults()
    per_kind = {k: sum(n for (kind, _), n in faults.items() if kind == k) for k in faulted}
    assert sum(per_kind.values()) >= 10, faults  # the run did meet faults, of several kinds
    assert len({f for _, f in faults}) >= 4, faults
    exact = ("read", "upload", "delete")
    assert {k: faulted[k] for k in exact} == {k: clean[k] + per_kind[k] for k in exact}, (clean, faulted, faults)
    # gcsfs's `info` races an object GET against a one-item listing and cancels the loser, whose
    # retry (after a fault) may then never be sent: at most one more request per fault there
    assert all(faulted[k] <= clean[k] + per_kind[k] for k in ("info", "list")), (clean, faulted, faults)


# -- end to end: the encode phase on gs:// through the proxy

@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory):
    from muse.testing.tiny import build_tiny_encoders

    return build_tiny_encoders(tmp_path_factory.mktemp("enc"))


def _encode_config(tmp_path, root, encoders, retries: int = 8):
    """A pipeline config on `root` with the tiny encoders, and 3 phase-1 shards of 4 rows written."""
    import yaml

    from muse.config import load_config
    from muse.testing.image_shards import write_image_shard
    from muse.testing.tiny import tiny_encode_overrides

    path = tmp_path / f"pipeline-{root.rsplit('/', 2)[-2]}.yaml"
    path.write_text(yaml.safe_dump({"storage": {"root": root, "retries": retries, "timeout_s": 1.0},
                                    "source": {"paths": ["unused.parquet"]},
                                    "encode": {"batch_size": 2, "row_group_size": 2}}))
    cfg = load_config(path, tiny_encode_overrides(encoders))
    st = Storage.from_config(cfg)
    for sid in range(3):
        write_image_shard(st, sid, [f"a caption {sid}-{i}" for i in range(4)])
    return cfg, st


def _encode(tmp_path, root, encoders, before=lambda: None):
    """Phase 1 shards written, then `run_encode`; {path under the root: bytes} of what it wrote
    (the root's own name and the manifest's creation time taken out: they differ by design)."""
    import json

    from muse.encode import run_encode

    cfg, st = _encode_config(tmp_path, root, encoders)
    before()
    summary = run_encode(cfg)
    assert summary["rows"] == 12 and summary["shards"] == 3
    out = {}
    for p in st.fs.find(st.path("encoded")):
        rel = st.relative(st.fs.unstrip_protocol(p))
        data = st.read_bytes(rel).replace(root.encode(), b"ROOT")
        if rel.endswith("_MANIFEST.json"):
            data = json.loads(data)
            data.pop("created")
        out[rel] = data
    return out


@pytest.mark.slow
def test_encode_through_faults_is_byte_identical(tmp_path, gcs_emulator, gcs_proxy, tiny_encoders, caplog):
    """Encode on gs:// at 5% faults, then in a storm (50% for 3 s, then clear): every encoded shard
    and the manifest (minus its timestamp) equal a fault-free run's, and the log shows retries."""
    import threading

    clean = _encode(tmp_path, gcs_emulator.new_root(), tiny_encoders)
    assert len([p for p in clean if p.endswith(".parquet")]) >= 4  # 3 shards + the shard table
    gcs_proxy.reset_counts()  # the schedule counts from here
    gcs_proxy.rate, gcs_proxy.seed = 0.05, 32  # a seed whose 5% meets reads and uploads
    started = time.monotonic()
    assert _encode(tmp_path, gcs_emulator.new_root(), tiny_encoders) == clean
    assert sum(n for (kind, _), n in gcs_proxy.faults().items() if kind in ("read", "upload")) >= 3, \
        gcs_proxy.faults()
    assert any("retrying in" in r.getMessage() for r in caplog.records if r.name == "muse.storage")
    gcs_proxy.rate = 0.0

    def storm():  # from the start of run_encode
        gcs_proxy.reset_counts()
        gcs_proxy.rate = 0.5
        threading.Timer(3.0, lambda: setattr(gcs_proxy, "rate", 0.0)).start()

    assert _encode(tmp_path, gcs_emulator.new_root(), tiny_encoders, before=storm) == clean
    assert sum(gcs_proxy.faults().values()) >= 2, gcs_proxy.faults()  # how many: as fast as the machine
    assert time.monotonic() - started < 150  # hang guard


def test_policy_comes_from_the_config_and_bad_values_name_the_key(tmp_path):
    import yaml

    from muse.config import ConfigError, load_config

    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "root")}, "source": {"paths": ["x.parquet"]}}))
    cfg = load_config(path, ["storage.retries=2", "storage.timeout_s=1.5", "storage.deadline_s=9"])
    assert Storage.from_config(cfg).retry == RetryPolicy(retries=2, timeout_s=1.5, deadline_s=9)
    for bad in ("storage.retries=-1", "storage.timeout_s=0", "storage.deadline_s=-3", "storage.retries=x"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config(path, [bad])


def test_what_the_policy_retries_is_transient_py_s_word():
    """The errors a fault produces are transient by muse/transient.py (the one owner of that list);
    a missing object or a refusal is not; a StorageError keeps its cause, so the flow's task retry
    sees a give-up on a 503 as transient too."""
    import aiohttp
    from gcsfs.retry import HttpError

    from muse.transient import TransferError, is_transient

    for exc in (TransferError("short read"), aiohttp.ClientPayloadError("cut"), TimeoutError(),
                HttpError({"code": 429, "message": "slow down"}), ConnectionResetError()):
        assert is_transient(exc), exc
    for exc in (FileNotFoundError("gs://b/x"), PermissionError(), HttpError({"code": 400, "message": "bad"})):
        assert not is_transient(exc), exc
    with pytest.raises(StorageError) as err:
        RetryPolicy(retries=0).delay(0, HttpError({"code": 503, "message": "x"}), time.monotonic(), "GET gs://b/o")
    assert is_transient(err.value) and "GET gs://b/o: failed after 1 try" in str(err.value)


def storm_at_first_request(proxy, seconds: float) -> None:
    """From the proxy's next request on, fault 50% of requests for `seconds`, then none (a storm
    that falls on the work, not on a subprocess's imports); counts start afresh."""
    import threading

    proxy.reset_counts()

    def run():
        deadline = time.monotonic() + 120
        while not proxy.counts() and time.monotonic() < deadline:
            time.sleep(0.01)
        proxy.rate = 0.5
        time.sleep(seconds)
        proxy.rate = 0.0

    threading.Thread(target=run, daemon=True).start()


@pytest.mark.slow  # three 8-step trainings in subprocesses (~30 s on 2 quiet cores)
def test_training_through_faults_gives_the_weights_of_a_fault_free_run(tmp_path, gcs_emulator, gcs_proxy):
    """`python -m muse.train` (a subprocess: its gcsfs talks to the proxy too) for 8 steps with a
    checkpoint at 4, on gs:// with 5% of its requests faulted (every kind but flipped bytes, which
    only the page checksums see, on purpose: tests/test_integrity.py): the step-8 weights, the
    loss curve and the loader's position equal a fault-free run's, and the proxy did fault it; the
    same after a storm (50% of requests for 3 s from the run's first request, then none)."""
    from muse.layout import metrics_file
    from tests.train_helpers import make_data, run_train, tiny_config

    gcs_proxy.menu = {kind: tuple(f for f in faults if f != "flip") for kind, faults in MENU.items()}

    def train(name: str, rate: float, before=lambda: None) -> tuple[dict, dict]:
        (tmp_path / name).mkdir()
        root = gcs_emulator.new_root()
        cfg = tiny_config(tmp_path / name, root, max_steps=8)
        gcs_proxy.rate = 0.0
        make_data(cfg, shards=2, rows=32, row_group_size=8)
        gcs_proxy.reset_counts()
        gcs_proxy.rate, gcs_proxy.seed = rate, 54
        before()
        r = run_train(cfg, "--set", "storage.retries=8", "--set", "storage.timeout_s=2", timeout=400)
        gcs_proxy.rate = 0.0
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        st = Storage(root)
        step = "checkpoints/t/step-00000008/"
        out = {f: st.read_bytes(step + f) for f in ("model.safetensors", "loader.json")}
        losses = [json.loads(x).get("loss") for x in st.read_bytes(metrics_file("t")).decode().splitlines()]
        return out | {"losses": losses}, gcs_proxy.faults()

    clean, _ = train("clean", 0.0)
    faulted, faults = train("faulted", 0.05)
    # seed 54's 5% meets the loader's reads and the checkpoint's uploads (6 faults of ~43 requests)
    assert {kind for kind, _ in faults} >= {"read", "upload"} and sum(faults.values()) >= 4, faults
    assert faulted == clean
    stormed, faults = train("storm", 0.0, before=lambda: storm_at_first_request(gcs_proxy, 3.0))
    assert sum(faults.values()) >= 2, faults
    assert stormed == clean


# -- the other phases on gs:// through the proxy

NO_FLIPS = {kind: tuple(f for f in faults if f != "flip") for kind, faults in MENU.items()}


def _tree(st: Storage, prefix: str) -> dict:
    """{path under the root: bytes} of everything under `prefix`, the root's own name taken out."""
    return {rel: st.read_bytes(rel).replace(st.uri.encode(), b"ROOT")
            for rel in (st.relative(st.fs.unstrip_protocol(p)) for p in st.fs.find(st.path(prefix)))}


def _seed_meeting(proxy, counts: dict, kinds: tuple, rate: float = 0.05) -> int:
    """The first seed whose schedule at `rate` faults at least one request of each of `kinds`
    among the first `counts[kind]` (what a fault-free run made): those requests are made again
    by the faulted run, so its faults are sure to land, however few requests the phase makes."""
    proxy.rate = rate
    for seed in range(10_000):
        if all(any(proxy.planned(k, n, seed) for n in range(counts.get(k, 0))) for k in kinds):
            proxy.rate = 0.0
            return seed
    raise AssertionError(f"no seed faults {kinds} within {counts}")


@pytest.mark.slow
def test_permanent_fault_on_one_image_shard_fails_only_that_shard(tmp_path, gcs_emulator, gcs_proxy, tiny_encoders):
    """Every read of images/00001.parquet stalls past the read timeout: encode names that object
    (its gs:// URL) in the error it raises, encodes and lists the two other shards, and ends
    within the policy's bounds (3 tries of 1 s each), not at a hang."""
    from muse.encode import EncodeError, run_encode
    from muse.layout import dataset_dir, read_manifest

    cfg, st = _encode_config(tmp_path, gcs_emulator.new_root(), tiny_encoders, retries=2)
    gcs_proxy.fail_always("images/00001.parquet", "stall", kind="read")
    started = time.monotonic()
    with pytest.raises(EncodeError) as err:
        run_encode(cfg)
    assert time.monotonic() - started < 60  # hang guard
    bad = st.url("images/00001.parquet")
    assert "1 shard(s) failed: 00001" in str(err.value) and bad in str(err.value), str(err.value)
    assert gcs_proxy.faults()[("read", "stall")] >= 3  # the first try and both retries met it
    gcs_proxy.always.clear()
    ds = dataset_dir(cfg)
    manifest = read_manifest(st, ds)
    assert [s["id"] for s in manifest["shards"]] == [0, 2] and manifest["rows"] == 8
    assert manifest["pending"] == [1]
    assert {f"{ds}/00000.parquet", f"{ds}/00002.parquet"} <= set(st.list(ds, suffix=".parquet"))
    assert f"{ds}/00001.parquet" not in st.list(ds, suffix=".parquet")


def _storm_from(proxy, kind: str, n: int, seconds: float, rate: float = 0.5) -> None:
    """Once the proxy has seen `n` requests of `kind`, fault `rate` of all requests for `seconds`,
    then clear (a thread's target: the storm meets a phase's later requests, not only its first)."""
    deadline = time.monotonic() + 120
    while proxy.counts().get(kind, 0) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    proxy.rate = rate
    time.sleep(seconds)
    proxy.rate = 0.0


def _download(tmp_path, root: str, source: str, before=lambda: None) -> dict:
    """`run_download` of `source` (a URL list on gs://) into `root` with img2dataset's real CLI;
    {path under the root: bytes} of what it wrote (no timestamps there: the registry records the
    source's md5 and the shards' rows, never when)."""
    from muse.config import load_config
    from muse.download import run_download

    cfg = load_config(None, data={
        "storage": {"root": root, "work_dir": str(tmp_path / "work"), "retries": 8, "timeout_s": 1.0},
        "source": {"paths": [source]},
        "download": {"image_size": 32, "processes": 1, "threads": 4, "shard_size": 8, "timeout_s": 4, "retries": 0}})
    before()
    summary = run_download(cfg)
    assert summary["rows_in"] == 14 and summary["shards"] == [0, 1], summary
    return _tree(Storage(root), "images")


@pytest.mark.slow
def test_download_through_faults_and_a_storm_is_byte_identical(tmp_path, gcs_emulator, gcs_proxy, caplog):
    """The download phase (img2dataset against the local image server, the shards written to gs://)
    at 5% faults, then in a storm (50% for 4 s from its first shard's upload, then clear): the image shards, their
    stats and `_SOURCES.json` equal a fault-free run's byte for byte, and every input row is in
    exactly once (none lost, none twice)."""
    import io
    import threading

    import pyarrow as pa
    import pyarrow.parquet as pq

    from muse.testing.imageserver import ImageServer

    with ImageServer() as srv:
        urls = [srv.url(f"/img/{i}.jpg") for i in range(12)] + [srv.url("/404"), srv.url("/png/3.png")]
        buf = io.BytesIO()
        pq.write_table(pa.table({"URL": urls, "TEXT": [f"caption {i}" for i in range(14)],
                                 "SAMPLE_ID": pa.array(range(14), pa.int64())}), buf)
        src = Storage(gcs_emulator.new_root("lists"))  # one URL list, outside the roots: same URI in each
        src.write_bytes("part-0.parquet", buf.getvalue())
        source = src.url("part-0.parquet")
        gcs_proxy.menu = NO_FLIPS
        gcs_proxy.reset_counts()
        clean = _download(tmp_path, gcs_emulator.new_root(), source)
        assert {"images/_SOURCES.json", "images/00001_stats.json", "images/_config.yaml"} <= set(clean)
        shards = [v for k, v in clean.items() if k.endswith(".parquet")]
        rows = pa.concat_tables([pq.read_table(io.BytesIO(b)) for b in shards])
        assert sorted(rows["SAMPLE_ID"].to_pylist()) == list(range(14))  # each row once
        assert rows["replaced"].to_pylist().count(True) == 1  # the 404, with its placeholder
        seed = _seed_meeting(gcs_proxy, gcs_proxy.counts(), ("read", "upload"))
        gcs_proxy.reset_counts()
        gcs_proxy.rate, gcs_proxy.seed = 0.05, seed
        started = time.monotonic()
        assert _download(tmp_path, gcs_emulator.new_root(), source) == clean
        faults = gcs_proxy.faults()
        assert {kind for kind, _ in faults} >= {"read", "upload"}, faults
        assert any("retrying in" in r.getMessage() for r in caplog.records if r.name == "muse.storage")
        gcs_proxy.rate = 0.0

        # the storm starts at the first shard's upload (the registry's is the first upload): the
        # planning's requests met faults above, these are the shards, markers and the summary's
        gcs_proxy.reset_counts()
        gcs_proxy.seed = 1
        storm = threading.Thread(target=_storm_from, args=(gcs_proxy, "upload", 2, 4.0), daemon=True)
        storm.start()
        assert _download(tmp_path, gcs_emulator.new_root(), source) == clean
        storm.join(timeout=10)
        faults = gcs_proxy.faults()
        assert "upload" in {kind for kind, _ in faults} and sum(faults.values()) >= 3, faults
        assert time.monotonic() - started < 120  # hang guard


@pytest.mark.slow
def test_sample_through_faults_writes_the_pngs_of_a_fault_free_run(tmp_path, gcs_emulator, gcs_proxy, tiny_encoders):
    """`run_sample` with its checkpoint on gs:// (the run's latest, found through LATEST) and its
    PNGs written there: at 5% faults on its reads and uploads, the PNG bytes (pixels and the
    parameters chunk) equal those of a fault-free run from the same checkpoint, and after a storm
    (50% for 2 s) too."""
    import torch

    from muse import checkpoint
    from muse.config import ModelConfig, load_config
    from muse.models import build_model
    from muse.sample import run_sample
    from muse.testing.tiny import CODEBOOK, TEXT_DIM, tiny_encode_overrides

    root = gcs_emulator.new_root()
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="base", preset="tiny", codebook_size=CODEBOOK, text_dim=TEXT_DIM))
    checkpoint.save(Storage(root), "t", model, checkpoint.TrainState(step=4), "train: {}\n", keep=1)

    def sample(out: str) -> dict:
        cfg = load_config(None, tiny_encode_overrides(tiny_encoders) + [f"sample.out={out}"], data={
            "storage": {"root": root, "retries": 8, "timeout_s": 1.0}, "source": {"paths": ["unused.parquet"]},
            "train": {"run_name": "t"}, "sample": {"steps": 4, "device": "cpu",
                                                  "prompts": ["a red circle", "a blue square"]}})
        written = run_sample(cfg)
        st = Storage(root)
        return {url.rsplit("/", 1)[-1].split("-", 1)[1]: st.read_bytes(st.relative(url)) for url in written}

    gcs_proxy.menu = NO_FLIPS
    gcs_proxy.reset_counts()
    clean = sample("samples/clean.png")
    assert sorted(clean) == ["000.png", "001.png", "grid.png"]
    seed = _seed_meeting(gcs_proxy, gcs_proxy.counts(), ("read", "upload"))
    gcs_proxy.reset_counts()
    gcs_proxy.rate, gcs_proxy.seed = 0.05, seed
    started = time.monotonic()
    assert sample("samples/faulted.png") == clean
    faults = gcs_proxy.faults()
    assert {kind for kind, _ in faults} >= {"read", "upload"}, faults
    gcs_proxy.rate = 0.0
    storm_at_first_request(gcs_proxy, 2.0)
    assert sample("samples/storm.png") == clean
    assert sum(gcs_proxy.faults().values()) >= 2, gcs_proxy.faults()
    assert time.monotonic() - started < 90  # hang guard

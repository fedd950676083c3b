"""`encode.devices`: shards spread over worker processes (real spawned processes, CPU devices) give
the bytes of a one-device run; `exact_fp32` keeps the TF32 flags right while threads encode at once."""

import threading

import numpy as np
import pytest
import torch
import yaml

from muse.config import ConfigError, load_config
from muse.encode import run_encode
from muse.encode.image import exact_fp32, load_vq
from muse.encode.shards import encode_devices
from muse.layout import dataset_dir, read_manifest
from muse.storage import Storage
from muse.testing.image_shards import write_image_shard
from muse.testing.tiny import build_tiny_encoders, tiny_encode_overrides

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory):
    return build_tiny_encoders(tmp_path_factory.mktemp("enc"), superres=False)


def make_cfg(tmp_path, root, encoders, *extra):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"storage": {"root": root}, "source": {"paths": ["unused.parquet"]},
                                    "encode": {"batch_size": 2, "row_group_size": 2}}))
    return load_config(path, tiny_encode_overrides(encoders) + list(extra))


def test_two_cpu_workers_give_the_bytes_of_one_device(tmp_path, tiny_encoders, capfd):
    runs = {}
    for name, extra in [("one", []), ("two", ["encode.devices=[cpu, cpu]", "encode.shards_per_task=1"])]:
        (tmp_path / name).mkdir()
        cfg = make_cfg(tmp_path / name, str(tmp_path / name / "root"), tiny_encoders, *extra)
        storage = Storage.from_config(cfg)
        for sid in range(5):
            write_image_shard(storage, sid, [f"caption {sid} {i}" for i in range(3)], size=64,
                              replaced=[i == sid % 3 for i in range(3)])
        summary = run_encode(cfg)
        assert summary["shards"] == 5 and summary["rows"] == 15 and summary["encoded_now"] == 5
        runs[name] = (cfg, storage)
        log = capfd.readouterr().err
        if name == "two":  # five chunks of one shard, each in a spawned worker (they print to fd 2)
            assert "on 2 worker processes (cpu, cpu)" in log and log.count("encode [cpu]: 1/1 shards") == 5
    (cfg, one), (cfg2, two) = runs["one"], runs["two"]
    ds = dataset_dir(cfg)
    assert ds == dataset_dir(cfg2)  # `devices` is where, not what: the same dataset version
    names = sorted(p.rsplit("/", 1)[-1] for p in one.list(ds))
    assert names == sorted(p.rsplit("/", 1)[-1] for p in two.list(ds))
    for name in names:  # shards, records, _ENCODERS.json, _SHARDS.parquet
        if name not in ("_MANIFEST.json", "_config.yaml"):
            assert one.read_bytes(f"{ds}/{name}") == two.read_bytes(f"{ds}/{name}"), name
    m1, m2 = one.read_json(f"{ds}/_MANIFEST.json"), two.read_json(f"{ds}/_MANIFEST.json")
    assert m2["encode"].pop("devices") == ["cpu", "cpu"] and m1["encode"].pop("devices") is None
    assert m2["encode"].pop("shards_per_task") == 1
    m1["encode"].pop("shards_per_task")
    assert {k: v for k, v in m1.items() if k != "created"} == {k: v for k, v in m2.items() if k != "created"}
    assert [s["id"] for s in read_manifest(two, ds)["shards"]] == list(range(5))


def test_one_listed_device_runs_in_this_process(tmp_path, tiny_encoders):
    cfg = make_cfg(tmp_path, str(tmp_path / "root"), tiny_encoders, "encode.devices=[cpu]")
    write_image_shard(Storage.from_config(cfg), 0, ["a", "b"], size=64)
    assert run_encode(cfg)["rows"] == 2


def test_devices_setting(tmp_path, tiny_encoders):
    cfg = make_cfg(tmp_path, str(tmp_path / "root"), tiny_encoders, "encode.devices=all")
    want = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"]
    assert encode_devices(cfg.encode) == want
    assert encode_devices(make_cfg(tmp_path, "r", tiny_encoders, "encode.device=cpu").encode) == ["cpu"]
    for bad in ("encode.devices=[gpu0]", "encode.devices=[]", "encode.devices=some"):
        with pytest.raises(ConfigError, match="devices"):
            make_cfg(tmp_path, "r", tiny_encoders, bad)


@pytest.fixture
def user_flags():
    """TF32 on, as a user (or the trainer) sets it; put back as it was after the test."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield ("high", True, True)
    torch.set_float32_matmul_precision(saved[2])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]


def _flags():
    return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32)


def test_overlapping_exact_sections_keep_the_flags(user_flags):
    """Thread A enters, B enters, A leaves while B still encodes: B must still run without TF32
    (a per-call save/restore turned it back on here), and the user's flags come back at the end
    (a per-call restore left them off)."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with exact_fp32():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b():
        a_in.wait(10)
        with exact_fp32():
            b_in.set()
            a_out.wait(10)
            seen["b after a left"] = _flags()

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen["b after a left"] == ("highest", False, False)
    assert _flags() == user_flags


def test_threads_encoding_at_once_leave_the_users_flags(user_flags, tiny_encoders):
    vq = load_vq(tiny_encoders["vq_model"])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8) for _ in range(4)]
    want = [vq.encode(x) for x in images]
    got = [None] * 4

    def work(i):
        for _ in range(3):
            got[i] = vq.encode(images[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert _flags() == user_flags


def _spawned_workers() -> list[int]:
    """This process's children started by multiprocessing's spawn (not its resource tracker)."""
    import os
    from pathlib import Path

    found = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except FileNotFoundError:
                pass
    return found


@pytest.mark.slow
def test_a_dead_worker_fails_its_shards_and_a_rerun_completes(tmp_path, tiny_encoders):
    """SIGKILL one worker after the first shard lands: the run fails naming shards, the manifest
    lists what was done (pending: the rest), and a re-run gives the bytes of an untouched run."""
    import os
    import signal
    import time

    from muse.encode import EncodeError

    runs = {}
    for name in ("killed", "clean"):
        (tmp_path / name).mkdir()
        cfg = make_cfg(tmp_path / name, str(tmp_path / name / "root"), tiny_encoders,
                       "encode.devices=[cpu, cpu]", "encode.shards_per_task=1")
        storage = Storage.from_config(cfg)
        for sid in range(12):
            write_image_shard(storage, sid, [f"caption {sid} {i}" for i in range(3)], size=64)
        runs[name] = (cfg, storage)
    cfg, storage = runs["killed"]
    ds = dataset_dir(cfg)
    outcome = {}

    def run():
        try:
            outcome["summary"] = run_encode(cfg)
        except EncodeError as err:
            outcome["error"] = str(err)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 120
    while time.time() < deadline and not storage.list(ds, suffix=".json", name_prefix="0"):
        time.sleep(0.01)
    victims = _spawned_workers()
    assert victims
    os.kill(victims[0], signal.SIGKILL)
    thread.join(180)
    assert "error" in outcome and "shard(s) failed" in outcome["error"]
    manifest = read_manifest(storage, ds)
    done = [s["id"] for s in manifest["shards"]]
    assert 0 < len(done) < 12 and sorted(done + manifest["pending"]) == list(range(12))
    run_encode(on_one_device(cfg))
    run_encode(runs["clean"][0])
    for sid in range(12):
        name = f"{sid:05d}.parquet"
        assert storage.read_bytes(f"{ds}/{name}") == runs["clean"][1].read_bytes(f"{ds}/{name}"), sid


def on_one_device(cfg):
    return cfg.model_copy(update={"encode": cfg.encode.model_copy(update={"devices": None})})


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="needs a GPU index that is not there")
def test_a_gpu_that_is_not_there_is_named_before_anything_starts(tmp_path, tiny_encoders):
    from muse.encode import EncodeError

    cfg = make_cfg(tmp_path, str(tmp_path / "root"), tiny_encoders, "encode.devices=[cpu, cuda:7]")
    with pytest.raises(EncodeError, match=r"cuda:7.*not visible"):
        encode_devices(cfg.encode)

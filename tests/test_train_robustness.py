"""Trainer robustness (issue 12): fatal errors end the job fast with one line naming where,
shards are verified against the manifest, exact resume with dropout, precision changes on resume."""

import time

import pytest
import torch

from muse import checkpoint, train
from muse.config import load_config
from muse.distributed import Dist
from muse.storage import Storage
from tests.train_helpers import make_data, run_train, tiny_config


def _storage(config):
    return Storage.from_config(load_config(config))


def _shard(config, sid=0):
    return f"encoded/{load_config(config).encode.version()}/{sid:05d}.parquet"


def _muse_lines(text):
    return [line for line in text.splitlines() if line.startswith("muse train: ")]


@pytest.mark.slow  # torchrun jobs
def test_truncated_shard_ends_two_ranks_with_two_workers_quickly(tmp_path):
    """Hang guard: on main the job never exited (loader workers ignore SIGTERM and were joined)."""
    config = tiny_config(tmp_path, str(tmp_path / "root"), num_workers=2, verify="none")
    make_data(config, shards=2, rows=24, row_group_size=8)
    storage = _storage(config)
    data = storage.read_bytes(_shard(config))
    storage.write_bytes(_shard(config), data[: len(data) // 2])
    start = time.monotonic()
    out = run_train(config, nproc=2, timeout=120)
    took = time.monotonic() - start
    assert out.returncode != 0 and took < 60, (took, out.stdout + out.stderr)
    lines = _muse_lines(out.stderr)
    assert lines, out.stderr
    # <shard/row group>: <problem>: <what to do>, on one line
    assert "00000.parquet row group" in lines[0] and "unreadable" in lines[0] and "muse encode" in lines[0]


@pytest.mark.slow  # torchrun jobs
def test_shard_size_and_sha256_checked_against_the_manifest(tmp_path, capsys):
    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=1)
    manifest = make_data(config)
    storage = _storage(config)
    rel = f"encoded/{load_config(config).encode.version()}/_MANIFEST.json"
    good = manifest["shards"][1]
    manifest["shards"][1] = {**good, "bytes": good["bytes"] + 1}
    storage.write_json(rel, manifest)
    assert train.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"00001.parquet: {good['bytes']} bytes, the manifest says {good['bytes'] + 1}" in err
    assert "muse encode" in err and "train.verify: none" in err
    # sizes right, content changed: only sha256 sees it
    manifest["shards"][1] = {**good, "sha256": "0" * 64}
    storage.write_json(rel, manifest)
    assert train.main(["--config", str(config), "--set", "train.verify=sha256"]) == 2
    assert "00001.parquet: sha256" in capsys.readouterr().err
    out = run_train(config, "--set", "train.verify=none")
    assert out.returncode == 0, out.stderr


def test_verify_rejects_unknown_values(tmp_path):
    from muse.config import ConfigError

    config = tiny_config(tmp_path, "r")
    with pytest.raises(ConfigError, match="train.verify"):
        load_config(config, ["train.verify=md5"])


@pytest.mark.slow  # torchrun jobs
def test_unreadable_checkpoint_is_named(tmp_path, capsys):
    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=2, checkpoint_every=2)
    make_data(config)
    assert run_train(config).returncode == 0
    storage = _storage(config)
    rel = checkpoint.latest(storage, "t")
    weights = storage.read_bytes(f"{rel}/model.safetensors")
    storage.write_bytes(f"{rel}/model.safetensors", weights[:100])
    assert train.main(["--config", str(config), "--set", "train.max_steps=4"]) == 2
    err = capsys.readouterr().err
    assert f"muse train: {storage.url(rel)}: model.safetensors" in err and "--resume none" in err
    storage.write_bytes(f"{rel}/trainer.pt", b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="step-00000002: trainer.pt"):
        checkpoint.load_state(storage, rel)


@pytest.mark.slow  # torchrun jobs
def test_resume_is_exact_with_dropout(tmp_path):
    """The global RNG (dropout) continues where it was: on main the loader's base-seed draw after
    restoring it shifted the stream and the weights drifted. The EMA resumes exactly too."""
    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=8, lr_schedule="constant", ema=True,
                         ema_decay=0.9)
    text = config.read_text().replace("model:\n", "model:\n  dropout: 0.2\n")
    config.write_text(text)
    make_data(config)
    assert run_train(config, "--set", "train.run_name=ref").returncode == 0
    out = run_train(config, "--set", "train.run_name=split", "--set", "train.max_steps=4")
    assert out.returncode == 0, out.stderr
    out = run_train(config, "--set", "train.run_name=split", "--set", "train.num_workers=2")
    assert out.returncode == 0 and "resumed from" in out.stdout, out.stdout + out.stderr
    storage = _storage(config)
    ref, got = (checkpoint.latest(storage, r) for r in ("ref", "split"))
    assert ref.endswith("step-00000008") and got.endswith("step-00000008")
    a, b = checkpoint.load_model(storage, ref).state_dict(), checkpoint.load_model(storage, got).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the EMA too (model_ema.safetensors, issue 13): it is read back on resume, not restarted
    a, b = (checkpoint.load_model(storage, r, ema=True).state_dict() for r in (ref, got))
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = checkpoint.load_state(storage, ref), checkpoint.load_state(storage, got)
    assert torch.equal(sa.rng[0]["torch"], sb.rng[0]["torch"])
    assert torch.equal(sa.rng[0]["mask"], sb.rng[0]["mask"])
    assert sa.loader == sb.loader and sa.step == sb.step == 8


@pytest.mark.slow  # torchrun jobs
def test_fp32_fallback_is_persisted_and_precision_change_resumes(tmp_path):
    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=2, checkpoint_every=2)
    manifest = make_data(config)
    assert run_train(config).returncode == 0  # CPU: fp32, the scaler's state is {}
    cfg, storage = load_config(config), _storage(config)
    assert checkpoint.latest(storage, "t")
    # an fp16 run (enabled scaler) resuming the fp32 checkpoint: on main load_state_dict({}) raised
    job = train.build(cfg, manifest, Dist())
    job.scaler, job.amp_dtype = torch.amp.GradScaler("cpu", enabled=True), torch.float16
    st, _ = train.resume(job, storage, "latest")
    assert st.step == 2 and job.scaler.is_enabled() and job.amp_dtype == torch.float16
    # a checkpoint written after the fp32 fallback resumes in fp32
    st.fp32_fallback = True
    checkpoint.save(storage, "t", job.raw_model, st, cfg.to_yaml(), 3)
    job = train.build(cfg, manifest, Dist())
    job.scaler, job.amp_dtype = torch.amp.GradScaler("cpu", enabled=True), torch.float16
    st, _ = train.resume(job, storage, "latest")
    assert st.fp32_fallback and job.amp_dtype is None and not job.scaler.is_enabled()


@pytest.mark.slow  # training jobs
def test_resume_checks_the_data_and_loader_settings_and_can_start_a_new_pass(tmp_path, capsys):
    """On main a changed train.loader_streams was accepted silently (another sample order) and a
    shard added to the manifest crashed with IndexError in data.py."""
    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=2, checkpoint_every=2)
    make_data(config, shards=2)
    assert run_train(config).returncode == 0
    assert train.main(["--config", str(config), "--set", "train.max_steps=4", "--set", "train.loader_streams=4"]) == 2
    err = capsys.readouterr().err
    assert "step-00000002: the data or loader settings changed" in err and "train.loader_streams 2 -> 4" in err
    assert "train.on_data_change=new_pass" in err
    make_data(config, shards=3)  # a refreshed dataset: shards 0 and 1 as before, shard 2 new
    assert train.main(["--config", str(config), "--set", "train.max_steps=4"]) == 2
    err = capsys.readouterr().err
    assert "shards added: 00002" in err and "loader_streams" not in err
    out = run_train(config, "--set", "train.max_steps=4", "--set", "train.on_data_change=new_pass")
    assert out.returncode == 0 and "resumed from" in out.stdout and "new pass 1" in out.stdout, out.stdout + out.stderr
    storage = _storage(config)
    st = checkpoint.load_state(storage, checkpoint.latest(storage, "t"))
    assert st.step == 4 and st.data_pass == 1 and st.fingerprint["shards"]["ids"] == "0-2"
    events = [m for m in checkpoint.read_metrics(storage, "t") if m.get("event")]
    assert events == [{"step": 2, "event": "new_pass", "data_pass": 1, "changes": "shards added: 00002"}]
    # the new pass resumes exactly from here on: same data, same settings
    out = run_train(config, "--set", "train.max_steps=6")
    assert out.returncode == 0 and "new pass" not in out.stdout, out.stdout + out.stderr


def test_the_collective_timeout_is_train_dist_timeout_s(tmp_path, monkeypatch):
    """Issue 25, crash 7: NCCL's 10-minute default killed jobs while rank 0 alone wrote a large
    checkpoint; the job's process group takes train.dist_timeout_s (default 30 minutes)."""
    import datetime

    from muse import distributed

    seen = {}
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(tiny_config(tmp_path, "r", dist_timeout_s=90))
    d = distributed.setup_distributed("cpu", cfg.train.dist_timeout_s)
    assert d.ddp and seen == {"backend": "gloo", "timeout": datetime.timedelta(seconds=90), "device_id": None}
    assert load_config(tiny_config(tmp_path, "r")).train.dist_timeout_s == 1800

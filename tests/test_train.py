"""The trainer end to end: torchrun DDP on the GCS emulator, exact resume, guards, clear errors."""

import signal
import time

import pytest
import torch

from muse import checkpoint, train
from muse.storage import Storage
from tests.train_helpers import make_data, read_tb, read_trace, run_train, signal_tree, tiny_config

STEPS = 8


@pytest.fixture(scope="module")
def gcs_run(gcs_emulator, tmp_path_factory):
    """One uninterrupted 2-rank run on the emulator: the reference for the resume tests."""
    tmp = tmp_path_factory.mktemp("ref")
    config = tiny_config(tmp, gcs_emulator.new_root(), max_steps=STEPS)
    make_data(config, shards=2, rows=24, row_group_size=8)
    out = run_train(config, "--set", "train.run_name=ref", nproc=2, env={"MUSE_TRACE": str(tmp / "ref")})
    assert out.returncode == 0, out.stdout + out.stderr
    return config, tmp, out


def _until(pred, what, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _final_weights(config, run):
    from muse.config import load_config

    storage = Storage.from_config(load_config(config))
    rel = checkpoint.latest(storage, run)
    assert rel and rel.endswith(f"step-{STEPS:08d}")
    return checkpoint.load_model(storage, rel).state_dict()


@pytest.mark.slow
def test_two_ranks_stay_identical_and_loss_falls(gcs_run):
    config, tmp, out = gcs_run
    r0, r1 = read_trace(tmp / "ref", 0), read_trace(tmp / "ref", 1)
    assert sorted(r0) == sorted(r1) == list(range(1, STEPS + 1))
    assert all(r0[s]["hash"] == r1[s]["hash"] for s in r0)  # DDP kept the replicas equal
    assert len({r0[s]["hash"] for s in r0}) == STEPS  # and every step changed them
    assert r0[1]["keys"] != r1[1]["keys"]  # ranks read their own strides
    assert r0[STEPS]["loss"] < r0[1]["loss"]
    assert "global batch 16" in out.stdout
    from muse.config import load_config

    storage = Storage.from_config(load_config(config))
    metrics = checkpoint.read_metrics(storage, "ref")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert storage.read_bytes("checkpoints/ref/loss.png")[:4] == b"\x89PNG"
    assert [p.rsplit("/", 1)[1] for p in storage.list("checkpoints/ref")] == [
        "LATEST", "loss.png", "metrics.jsonl", "step-00000004", "step-00000008", "tb"]
    # TensorBoard events uploaded to the bucket by rank 0 alone: one file, every step once
    assert len(storage.list("checkpoints/ref/tb")) == 1
    loss = read_tb(storage, "ref", tmp).Scalars("train/loss")
    assert [p.step for p in loss] == list(range(1, STEPS + 1))
    assert [p.value for p in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("sig,pause,workers", [(signal.SIGTERM, 3, 2), (signal.SIGKILL, 6, 1)])
def test_interrupt_and_resume_matches_uninterrupted(gcs_run, sig, pause, workers):
    config, tmp, _ = gcs_run
    run = f"r{int(sig)}"
    trace = tmp / run
    proc = run_train(config, "--set", f"train.run_name={run}", nproc=2, wait=False,
                     env={"MUSE_TRACE": str(trace), "MUSE_PAUSE_AT_STEP": str(pause)})
    try:
        _until(lambda: pause in read_trace(trace, 0) and pause in read_trace(trace, 1), f"step {pause}")
        signal_tree(proc.pid, sig)  # preemption signals every process of the job
        log = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:  # only while unreaped: a freed pid may already be someone else's
            signal_tree(proc.pid, signal.SIGKILL)
    if sig == signal.SIGTERM:
        assert "SIGTERM received" in log and f"step-{pause:08d}" in log, log
    assert STEPS not in read_trace(trace, 0)
    # resume with a different number of loader workers
    out = run_train(config, "--set", f"train.run_name={run}", "--set", f"train.num_workers={workers}",
                    nproc=2, env={"MUSE_TRACE": str(trace)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resumed from" in out.stdout
    ref, got = read_trace(tmp / "ref", 0), read_trace(trace, 0)
    assert [got[s]["keys"] for s in range(1, STEPS + 1)] == [ref[s]["keys"] for s in range(1, STEPS + 1)]
    assert read_trace(trace, 1)[STEPS]["keys"] == read_trace(tmp / "ref", 1)[STEPS]["keys"]
    # the interrupted run's events were uploaded at its checkpoint; the resumed run's replay hides
    # its overlap, so TensorBoard shows every step once
    from muse.config import load_config

    acc = read_tb(Storage.from_config(load_config(config)), run, tmp)
    assert [p.step for p in acc.Scalars("train/loss")] == list(range(1, STEPS + 1))
    a, b = _final_weights(config, "ref"), _final_weights(config, run)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=5, checkpoint_every=100)
    make_data(config)
    out = run_train(config, env={"MUSE_TRACE": str(tmp_path / "tr"), "MUSE_INJECT_NONFINITE_STEPS": "3,4"})
    assert out.returncode == 0, out.stdout + out.stderr
    tr = read_trace(tmp_path / "tr")
    assert [tr[s]["skipped"] for s in range(1, 6)] == [0, 0, 1, 2, 2]
    assert tr[2]["hash"] == tr[3]["hash"] == tr[4]["hash"] != tr[5]["hash"]  # skipped = untouched
    assert "non-finite" in out.stdout
    # the LR moves from zero during warmup (warmup_steps=2)
    assert 0 < tr[1]["lr"] < tr[2]["lr"] < tr[3]["lr"]


@pytest.mark.slow
def test_nonfinite_in_a_row_stops_with_advice(tmp_path):
    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=8, max_nonfinite_steps=3)
    make_data(config)
    out = run_train(config, env={"MUSE_INJECT_NONFINITE_STEPS": "2,3,4,5"})
    assert out.returncode == 3
    assert "3 non-finite steps in a row" in out.stderr and "train.mixed_precision: false" in out.stderr


def test_lr_schedule_warms_up_from_nonzero_then_decays(tmp_path):
    from muse.config import load_config

    cfg = load_config(tiny_config(tmp_path, "r", warmup_steps=10, min_lr_ratio=0.1))
    f = train.lr_lambda(cfg, total_steps=100)
    warm = [f(s) for s in range(11)]
    assert warm[0] > 0 and warm == sorted(warm) and warm[10] == 1.0
    assert f(55) < 1.0 and f(100) == pytest.approx(0.1)


def _main(capsys, config, *extra):
    rc = train.main(["--config", str(config), *extra])
    return rc, capsys.readouterr().err


def test_bad_config_and_data_fail_clearly(tmp_path, capsys):
    config = tiny_config(tmp_path, str(tmp_path / "root"))
    rc, err = _main(capsys, config, "--set", "train.grad_accum=0")
    assert rc == 2 and "train.grad_accum" in err
    rc, err = _main(capsys, config)
    assert rc == 2 and "_MANIFEST.json does not exist" in err and "muse encode" in err
    make_data(config)
    rc, err = _main(capsys, config, "--set", "model.text_dim=32")
    assert rc == 2 and "model.text_dim=32" in err and "T5 width is 16" in err
    rc, err = _main(capsys, config, "--set", "train.num_workers=3")
    assert rc == 2 and "train.loader_streams" in err
    from muse.config import load_config

    storage = Storage.from_config(load_config(config))
    rel = f"encoded/{load_config(config).encode.version()}/_MANIFEST.json"
    storage.write_json(rel, {**storage.read_json(rel), "grid": 32})
    rc, err = _main(capsys, config)
    assert rc == 2 and "data's is 32x32" in err


@pytest.mark.slow
def test_muse_train_launches_torchrun(tmp_path):
    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=2)
    make_data(config)
    from muse.cli import main

    assert main(["train", "--config", str(config), "--set", "train.nproc_per_node=1"]) == 0
    assert checkpoint.latest(Storage(str(tmp_path / "root")), "t").endswith("step-00000002")


@pytest.mark.slow
def test_superres_with_ema_and_downweight_trains_and_saves(tmp_path):
    from muse.config import load_config

    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=2, ema=True, ema_decay=0.5,
                         replaced_rows="downweight", batch_size=2, grad_accum=1)
    text = config.read_text().replace("model:\n", "model:\n  kind: superres\n")
    config.write_text(text + "encode:\n  superres: true\ndownload:\n  image_size: 512\n")
    make_data(config, shards=1, rows=8, row_group_size=4, superres=True, replaced_every=2)
    out = run_train(config)
    assert out.returncode == 0, out.stdout + out.stderr
    storage = Storage.from_config(load_config(config))
    rel = checkpoint.latest(storage, "t")
    state = checkpoint.load_state(storage, rel)
    params = list(checkpoint.load_model(storage, rel).parameters())
    assert state.step == 2 and len(state.loader) == 1
    averages = [state.ema[n] for n, _ in checkpoint.load_model(storage, rel).named_parameters()]  # model_ema
    assert [e.shape for e in averages] == [p.shape for p in params]
    assert any(not torch.equal(e, p) for e, p in zip(averages, params))  # an average, not a copy

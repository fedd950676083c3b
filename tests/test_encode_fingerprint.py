"""Content-addressed encoders: a dataset version records the weights it was encoded with and
refuses shards from other weights behind the same name (issue 13, finding 6)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from muse.config import load_config
from muse.encode import EncodeError, encode_shard, plan_encode, run_encode
from muse.encode.fingerprint import weights_fingerprint
from muse.encode.image import load_vq, vq_from_ref
from muse.encode.shards import Encoders
from muse.layout import ENCODERS, dataset_dir, done_marker, read_manifest
from muse.storage import Storage
from muse.testing.image_shards import write_image_shard
from muse.testing.tiny import build_tiny_t5, build_tiny_vq, tiny_encode_overrides

torch.set_num_threads(1)


def _cfg(tmp_path, paths):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "root")}, "source": {"paths": ["x.parquet"]},
                                    "encode": {"batch_size": 2, "row_group_size": 2}}))
    return load_config(path, tiny_encode_overrides(paths))


def test_weights_rebuilt_at_the_same_path_are_refused_and_the_same_weights_accepted(tmp_path):
    paths = {"text_model": build_tiny_t5(tmp_path / "t5"), "vq_model": build_tiny_vq(tmp_path / "vq", seed=0)}
    cfg = _cfg(tmp_path, paths)
    storage, ds = Storage.from_config(cfg), dataset_dir(cfg)
    write_image_shard(storage, 0, ["a red fox", "a blue square"])
    Encoders._cache.clear()
    run_encode(cfg)
    recorded = storage.read_json(f"{ds}/{ENCODERS}")["info"]["fingerprints"]
    assert recorded["vq_model"] == weights_fingerprint(paths["vq_model"], None, None, "encode.vq_model")
    assert recorded["vq_model"].startswith("sha256:") and set(recorded) == {"text_model", "vq_model"}

    write_image_shard(storage, 1, ["a green circle", "two cats"])
    # a retry pass's generation 1 of shard 0 goes into the same version: the same refusal applies
    write_image_shard(storage, 0, ["a red fox", "a blue square"], generation=1, changed=[1])
    build_tiny_vq(tmp_path / "vq", seed=1)  # other weights, same folder, same config: same version
    Encoders._cache.clear()  # a new worker process
    assert dataset_dir(cfg) == ds
    new = weights_fingerprint(paths["vq_model"], None, None, "encode.vq_model")
    assert new != recorded["vq_model"]
    with pytest.raises(EncodeError) as err:
        run_encode(cfg)
    msg = str(err.value)
    assert recorded["vq_model"] in msg and new in msg and "vq_model" in msg and "text_model" not in msg
    assert "revision" in msg and "delete" in msg  # what to do
    with pytest.raises(EncodeError, match="other weights"):  # the flow's per-shard path refuses too
        encode_shard(cfg, 1, storage)
    assert plan_encode(cfg, storage) == [0, 1] and not storage.exists(done_marker(ds, 1))
    assert not storage.exists(done_marker(ds, 0, 1)) and read_manifest(storage, ds)["shards"][0]["generation"] == 0

    build_tiny_vq(tmp_path / "vq", seed=0)  # the recorded weights again: accepted
    Encoders._cache.clear()
    assert run_encode(cfg)["shards"] == 2 and plan_encode(cfg, storage) == []
    assert [s["generation"] for s in read_manifest(storage, ds)["shards"]] == [1, 0]
    record = storage.read_json(done_marker(ds, 1))
    assert record["device"] == "cpu"
    assert set(record["versions"]) == {"torch", "diffusers", "transformers"}
    assert record["versions"]["torch"] == torch.__version__


def test_vq_encoding_runs_without_tf32_at_highest_precision(tmp_path):
    vq = load_vq(build_tiny_vq(tmp_path / "vq"))
    seen = []
    vq.model.encoder.register_forward_pre_hook(lambda m, a: seen.append(
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())))
    before = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    torch.set_float32_matmul_precision("high")  # what a trainer in the same process may have set
    try:
        vq.encode(np.zeros((1, 256, 256, 3), np.uint8))
        assert seen == [(False, False, "highest")]
        assert torch.get_float32_matmul_precision() == "high"  # restored after
    finally:
        torch.set_float32_matmul_precision(before[1])
        torch.backends.cudnn.allow_tf32 = before[0]


def test_hub_fingerprint_is_the_commit_the_cache_resolves(tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit, tagged = "a" * 40, "b" * 40
    repo = tmp_path / "models--org--vq"
    for sha in (commit, tagged):
        (repo / "snapshots" / sha / "vqvae").mkdir(parents=True)
        (repo / "snapshots" / sha / "vqvae" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "refs" / "v1").write_text(tagged)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert weights_fingerprint("org/vq", "vqvae", None, "encode.vq_model") == f"hub:org/vq@{commit}"
    assert weights_fingerprint("org/vq", "vqvae", "v1", "encode.vq_model") == f"hub:org/vq@{tagged}"


def test_a_revision_on_a_local_folder_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="encode.vq_model.*local folder.*revision"):
        weights_fingerprint(str(tmp_path), None, "v1", "encode.vq_model")


def test_pinned_revision_changes_the_version_unpinned_keeps_it(tmp_path):
    cfg = _cfg(tmp_path, {"text_model": "t5", "vq_model": "vq"})
    pinned = cfg.encode.model_copy(update={"vq_revision": "abc"})
    assert pinned.version() != cfg.encode.version()
    assert Path(dataset_dir(cfg)).name == cfg.encode.version()
    # unpinned: the hash versions had before revisions existed, so existing datasets stay found
    keys = ("text_model", "text_max_length", "text_dtype", "vq_model", "vq_subfolder", "vq_format", "superres",
            "superres_vq_model", "superres_vq_subfolder", "superres_vq_format")
    blob = json.dumps({k: getattr(cfg.encode, k) for k in keys}, sort_keys=True)
    assert cfg.encode.version() == hashlib.sha256(blob.encode()).hexdigest()[:10]


def _hub_cache(root: Path, revisions: dict[str, int]) -> dict[str, str]:
    """A Hugging Face cache holding `org/vq` (subfolder vqvae) at several refs, one tiny VQ
    (its seed) per ref, laid out as huggingface_hub writes it: refs/<name> -> snapshots/<commit>."""
    repo = root / "models--org--vq"
    (repo / "refs").mkdir(parents=True)
    commits = {}
    for i, (ref, seed) in enumerate(revisions.items()):
        commits[ref] = f"{i + 1:x}" * 40
        build_tiny_vq(repo / "snapshots" / commits[ref] / "vqvae", seed=seed)
        (repo / "refs" / ref).write_text(commits[ref])
    return commits


def test_a_pinned_revision_loads_that_commit_and_is_its_fingerprint(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from muse.sample import load_decoder

    commits = _hub_cache(tmp_path / "hub", {"main": 0, "v1": 1})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the conftest sets it; the cache is all there is
    want = {ref: load_vq(str(tmp_path / "hub/models--org--vq/snapshots" / sha / "vqvae")).model.state_dict()
            for ref, sha in commits.items()}
    cfg = _cfg(tmp_path, {"text_model": "unused", "vq_model": "org/vq"})
    for revision in (None, "v1"):
        e = cfg.encode.model_copy(update={"vq_subfolder": "vqvae", "vq_revision": revision})
        got = load_decoder(e, torch.device("cpu")).model.state_dict()  # what `muse sample` decodes with
        ref = revision or "main"
        assert all(torch.equal(got[k], want[ref][k]) for k in want[ref])
        assert weights_fingerprint("org/vq", "vqvae", revision, "encode.vq_model") == f"hub:org/vq@{commits[ref]}"


def test_preflight_looks_for_the_pinned_revision_in_the_cache(tmp_path, monkeypatch):
    """The preflight dropped `*_revision` and looked for the newest commit (issue 24 finding 4):
    offline with only the pinned commit cached it refused a run whose load works, and with only
    the newest cached it passed a run whose load then fails. It now checks what the loader loads."""
    from huggingface_hub import constants

    from muse.hub import HubUnavailable
    from muse.preflight import check_models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the cache is all there is
    cfg = _cfg(tmp_path, {"text_model": build_tiny_t5(tmp_path / "t5"), "vq_model": "org/vq"})
    for phase in ("encode", "sample", "eval"):
        _hub_cache(tmp_path / phase, {"v1": 1})          # the tag v1 only: no main
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / phase))
        pinned = cfg.model_copy(update={"encode": cfg.encode.model_copy(
            update={"vq_subfolder": "vqvae", "vq_revision": "v1"}), "eval": cfg.eval.model_copy(
            update={"clip_model": str(tmp_path / "t5")})})
        check_models(pinned, [phase])
        assert vq_from_ref(pinned.encode.vq_ref).codebook_size  # and the loader agrees
        newest = pinned.model_copy(update={"encode": pinned.encode.model_copy(update={"vq_revision": None})})
        with pytest.raises(HubUnavailable, match="encode.vq_model='org/vq'"):
            check_models(newest, [phase])
        other = pinned.model_copy(update={"encode": pinned.encode.model_copy(update={"vq_revision": "v2"})})
        with pytest.raises(HubUnavailable, match="encode.vq_model='org/vq'"):
            check_models(other, [phase])

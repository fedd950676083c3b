"""One schema version per on-disk format (muse/layout.py): files of any other version, or of none
(written before versions were recorded), are refused with an error naming the file and saying
what to do; the run folder's names all come from muse/layout.py."""

import json

import pytest
import torch

from muse import checkpoint, layout
from muse.config import ModelConfig
from muse.encode.shards import EncodeError, encoder_facts_to_write
from muse.layout import DataError, read_manifest
from muse.models import build_model, load_pretrained
from muse.storage import Storage
from muse.testing.datasets import write_test_dataset

DIR = "encoded/v1"


def _tiny():
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny", codebook_size=64, text_dim=16))


@pytest.mark.parametrize("version", [0, 2, None])
def test_image_registry_of_another_version_is_refused(tmp_path, version):
    from muse.download.sources import SourceError, load_registry

    st = Storage(str(tmp_path / "root"))
    assert load_registry(st) == {"schema_version": layout.IMAGES_VERSION, "next_shard": 0, "sources": {}}
    st.write_json(layout.REGISTRY, {"next_shard": 0, "sources": {}} | ({"schema_version": version} if version is not None else {}))
    with pytest.raises(SourceError, match=rf"_SOURCES.json: schema version {version!r}.*delete .*images and download"):
        load_registry(st)


@pytest.mark.parametrize("version", ["0", "2", None])
def test_encoded_manifest_of_another_version_is_refused(tmp_path, version):
    st = Storage(str(tmp_path / "root"))
    write_test_dataset(st, DIR, shards=1, rows=4, row_group_size=2)
    header = st.read_json(f"{DIR}/{layout.MANIFEST}")
    assert header["schema_version"] == layout.SCHEMA_VERSION and read_manifest(st, DIR)["rows"] == 4
    st.write_json(f"{DIR}/{layout.MANIFEST}", {k: v for k, v in header.items() if k != "schema_version"}
                  | ({"schema_version": version} if version else {}))
    with pytest.raises(DataError, match=rf"_MANIFEST.json: schema version {version!r}, this code reads only '1'"
                                        r".*delete .*encoded/v1, then `muse encode`"):
        read_manifest(st, DIR)


def test_encoders_record_of_another_version_is_refused(tmp_path):
    st = Storage(str(tmp_path / "root"))
    st.write_json(f"{DIR}/{layout.ENCODERS}", {"info": {"schema_version": "0", "fingerprints": {}}})
    with pytest.raises(EncodeError, match=r"_ENCODERS.json: schema version '0'.*delete .*encoded/v1 and encode it"):
        encoder_facts_to_write(None, None, st, DIR)  # refused before any model is looked at


@pytest.mark.parametrize("version", [0, 2, None])
def test_checkpoint_of_another_version_is_refused(tmp_path, version):
    st = Storage(str(tmp_path / "root"))
    state = checkpoint.TrainState(step=3, loader=[{"batch": 1}], fingerprint={"seed": 0})
    rel = checkpoint.save(st, "t", _tiny(), state, "{}\n", keep=2)
    assert rel == layout.step_dir("t", 3) == "checkpoints/t/step-00000003"
    loaded = checkpoint.load_state(st, rel)
    assert (loaded.step, loaded.loader, loaded.fingerprint) == (3, [{"batch": 1}], {"seed": 0})
    saved = st.read_json(f"{rel}/{layout.LOADER_FILE}")
    assert saved["schema_version"] == layout.CHECKPOINT_VERSION
    st.write_json(f"{rel}/{layout.LOADER_FILE}", {k: v for k, v in saved.items() if k != "schema_version"}
                  | ({"schema_version": version} if version is not None else {}))
    with pytest.raises(checkpoint.CheckpointError, match=rf"step-00000003/loader.json: schema version {version!r}"
                                                         r".*--resume none"):
        checkpoint.load_state(st, rel)


@pytest.mark.parametrize("version", [0, 2, None])
def test_model_config_of_another_version_is_refused(tmp_path, version):
    _tiny().save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    assert cfg["_schema_version"] == layout.MODEL_CONFIG_VERSION
    assert load_pretrained(tmp_path / "m").config.downsample == cfg["downsample"]
    del cfg["_schema_version"]
    path.write_text(json.dumps(cfg | ({"_schema_version": version} if version is not None else {})))
    with pytest.raises(ValueError, match=rf"m/config.json: schema version {version!r}.*save the model again"):
        load_pretrained(tmp_path / "m")


def test_model_config_missing_a_field_is_refused(tmp_path):
    """No default fills a missing field: a config.json without `downsample` is an error, not a
    model over every token."""
    _tiny().save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    del cfg["downsample"]
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config keys missing \['downsample'\]"):
        load_pretrained(tmp_path / "m")


def test_the_run_folder_is_named_in_layout():
    assert layout.run_dir("r") == "checkpoints/r"
    assert layout.step_dir("r", 100) == "checkpoints/r/step-00000100"
    assert layout.step_of("gs://b/checkpoints/r/step-00000100/") == 100 and layout.step_of("x/latest") is None
    assert layout.latest_file("r") == "checkpoints/r/LATEST"
    assert layout.metrics_file("r") == "checkpoints/r/metrics.jsonl"
    assert layout.loss_curve_file("r") == "checkpoints/r/loss.png"
    assert layout.tb_dir("r") == "checkpoints/r/tb"
    assert layout.eval_results("r", 8) == "checkpoints/r/eval/step-00000008"
    assert layout.eval_results("r", "custom") == "checkpoints/r/eval/custom"
    assert layout.training_sample("r", 8) == "checkpoints/r/samples/step-00000008.png"

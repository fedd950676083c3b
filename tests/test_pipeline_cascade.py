"""The pipeline flow's cascade option: base run, then a super-res run on the same dataset, then
sampling through both checkpoints (issue 13). The commands themselves run end to end in
tests/test_cascade.py; here: what the flow hands them, and the refusals before any work."""

import pytest
import yaml

from flows.common import ConfigError, cfg_from
from flows.pipeline import cascade_sampling, pipeline_flow, superres_run
from muse.config import load_config


def _config(tmp_path, **encode):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "root")}, "source": {"paths": ["u.jsonl"]},
                                    "download": {"image_size": 512}, "encode": encode,
                                    "train": {"run_name": "fox"}}))
    return str(path)


def test_superres_run_trains_the_superres_kind_on_the_same_data_under_its_own_name(tmp_path):
    config = _config(tmp_path, superres=True)
    base = ["train.max_steps=3"]
    sr = superres_run(cfg_from(config, base), base, ["model.preset=small"])
    cfg_b, cfg_s = load_config(config, base), load_config(config, sr)
    assert cfg_s.model.kind == "superres" and cfg_s.train.run_name == "fox-sr" and cfg_s.model.preset == "small"
    assert cfg_s.train.max_steps == 3 and cfg_s.encode.version() == cfg_b.encode.version()  # same dataset
    assert cfg_b.model.kind == "base" and cfg_b.train.run_name == "fox"


def test_sampling_goes_through_both_checkpoints_only_with_the_cascade(tmp_path):
    config = _config(tmp_path, superres=True)
    assert cascade_sampling("gs://b/checkpoints/fox/step-00000003", None) == []
    sets = cascade_sampling("gs://b/checkpoints/fox/step-00000003", "gs://b/checkpoints/fox-sr/step-00000003")
    s = load_config(config, sets).sample
    assert s.checkpoint == "gs://b/checkpoints/fox/step-00000003"
    assert s.superres_checkpoint == "gs://b/checkpoints/fox-sr/step-00000003"


@pytest.mark.parametrize("encode,extra,error", [
    ({}, [], "encode.superres must be true"),
    ({"superres": True}, ["model.kind=superres"], "model.kind is 'superres'"),
])
def test_cascade_is_refused_before_any_work_without_superres_data(tmp_path, encode, extra, error):
    config = _config(tmp_path, **encode)
    with pytest.raises(ConfigError, match=error):
        pipeline_flow.fn(config, extra, cascade=True)  # .fn: the flow body, before its first subflow
    assert not (tmp_path / "root").exists()

"""Config errors name the key and say what is allowed."""

import re

import pytest

from muse.config import ConfigError, load_config, parse_override

BASE = {"source": {"paths": ["urls.parquet"]}}


def load(data=None, overrides=None):
    return load_config(None, overrides or [], data=data if data is not None else BASE)


def test_defaults_and_override():
    cfg = load(overrides=["download.image_size=64", "source.max_samples=10"])
    assert cfg.download.image_size == 64 and cfg.source.max_samples == 10
    assert cfg.source.url_column == "URL" and cfg.source.caption_column == "TEXT"


@pytest.mark.parametrize("overrides, needle", [
    (["download.imagesize=64"], "download.imagesize: unknown key"),
    (["download.processes=many"], "download.processes"),
    (["download.resize_mode=stretch"], "download.resize_mode"),
    (["download.distributor=dask"], "download.distributor"),
    (["encode.fanout=dask"], "encode.fanout"),
    (["encode.gpus_per_task=-1"], "encode.gpus_per_task"),
    (["encode.superres=true"], "download.image_size >= 512"),
    (["download.image_size=4"], "download.image_size"),
    (["train.num_workers=3"], "train.num_workers (3) must divide train.loader_streams (8)"),
])
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load(overrides=overrides)


def test_missing_source_paths_names_the_key():
    with pytest.raises(ConfigError, match=r"source\.paths: required value is missing"):
        load(data={"source": {}})
    with pytest.raises(ConfigError, match=r"source: required value is missing"):
        load(data={})


def test_bad_set_syntax():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_override("download.image_size")
    with pytest.raises(ConfigError, match="empty key segment"):
        parse_override("download..image_size=3")
    with pytest.raises(ConfigError, match=r"download\.image_size: cannot parse"):
        parse_override("download.image_size=[1,")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_shipped_pipeline_yaml_is_valid():
    cfg = load_config("pipeline.yaml")
    assert cfg.download.distributor == "multiprocessing"


def test_wandb_is_off_by_default_and_typed():
    assert load().train.wandb is None
    w = load(overrides=["train.wandb.mode=offline"]).train.wandb
    assert (w.project, w.entity, w.mode) == ("muse", None, "offline")
    with pytest.raises(ConfigError, match=r"train\.wandb\.mode"):
        load(overrides=["train.wandb.mode=sometimes"])
    with pytest.raises(ConfigError, match=r"train\.wandb\.projet: unknown key"):
        load(overrides=["train.wandb.projet=x"])


def test_shipped_pipeline_yaml_restates_the_defaults():
    """pipeline.yaml documents the defaults: every section equals the config's defaults, key by key
    (source.paths has none: it is the one required key)."""
    from muse.config import PipelineConfig

    shipped = load_config("pipeline.yaml").model_dump()
    defaults = PipelineConfig(source={"paths": shipped["source"]["paths"]}).model_dump()
    assert set(shipped) == set(defaults) == set(PipelineConfig.model_fields)
    for section in defaults:
        for key, value in defaults[section].items():
            assert shipped[section][key] == value, \
                f"pipeline.yaml {section}.{key} = {shipped[section][key]!r}, muse/config.py default {value!r}"
    assert shipped == defaults


def test_model_presets_have_one_home():
    """The model classes' defaults are the base preset + the config's defaults, and every preset is complete."""
    from muse.config import MODEL_PRESETS, ModelConfig
    from muse.models import MuseConfig, model_config

    assert model_config(ModelConfig()) == MuseConfig()
    keys = set(MODEL_PRESETS["base"])
    assert all(set(p) == keys for p in MODEL_PRESETS.values())
    assert ModelConfig.model_fields["preset"].annotation.__args__ == tuple(MODEL_PRESETS)
    for name, preset in MODEL_PRESETS.items():
        built = model_config(ModelConfig(preset=name))
        assert {k: getattr(built, k) for k in keys} == preset, name

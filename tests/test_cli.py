"""The `muse` command line: config errors exit 2 with the key named, overrides apply."""

import subprocess
import sys
from pathlib import Path

import pytest

from muse.cli import build_parser, main
from muse.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_phase():
    out = subprocess.run([sys.executable, "-m", "muse.cli", "--help"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    for cmd in ("download", "encode", "train", "sample", "run"):
        assert cmd in out


@pytest.mark.parametrize("override, needle", [
    ("train.grad_acum=3", "train.grad_acum: unknown key"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("download.resize_mode=stretch", "download.resize_mode"),
    ("encode.superres=true", "download.image_size >= 512"),
    ("train", "expected dotted.key=value"),
])
def test_bad_override_exits_2_naming_the_key(override, needle, capsys):
    code = main(["download", "--config", str(REPO / "pipeline.yaml"), "--set", override])
    assert code == 2
    assert needle in capsys.readouterr().err


def test_missing_config_file_is_named(tmp_path, capsys):
    assert main(["encode", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_overrides_reach_the_config():
    cfg = load_config(REPO / "pipeline.yaml", ["train.lr=3e-4", "storage.root=gs://b/p",
                                               "source.paths=[a.csv, b.jsonl]"])
    assert cfg.train.lr == 3e-4 and cfg.storage.root == "gs://b/p"
    assert cfg.source.paths == ["a.csv", "b.jsonl"]


def test_sample_flags_become_overrides():
    args = build_parser().parse_args(["sample", "--prompt", "a cat", "--prompt", "a dog", "--out", "x.png"])
    from muse.cli import _sample_overrides

    cfg = load_config(REPO / "pipeline.yaml", _sample_overrides(args))
    assert cfg.sample.prompts == ["a cat", "a dog"] and cfg.sample.out == "x.png"


def test_pipeline_yaml_lists_every_key():
    """pipeline.yaml is the documentation of the config: every field appears in it."""
    import yaml

    from muse.config import PipelineConfig

    data = yaml.safe_load((REPO / "pipeline.yaml").read_text())
    for section, field in PipelineConfig.model_fields.items():
        assert section in data, section
        sub = field.annotation
        for key in sub.model_fields:
            assert key in data[section], f"{section}.{key} missing from pipeline.yaml"


def test_library_never_imports_prefect():
    code = ("import sys, muse.cli, muse.download, muse.encode, muse.data, muse.train, muse.sample, muse.testing.demo, "
            "muse.checkpoint, muse.models; assert 'prefect' not in sys.modules, 'muse imported prefect'")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr

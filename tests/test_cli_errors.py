"""What a new user meets: `muse` checks the cheap things first and says in one line what to do.

Every case runs the real command line in a subprocess whose hub host cannot be resolved
(`HF_ENDPOINT` on the reserved `.invalid` domain, so this holds on a machine with network
too), with an empty Hugging Face cache and without HF_HUB_OFFLINE unless a case sets it.
The timeout is a hang guard: before, these cases spent a minute retrying the hub.
"""

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GUARD_S = 60
HOST = "huggingface.invalid"  # RFC 2606: never resolves


def muse(tmp_path, *args, **env):
    full = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
            "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"https://{HOST}", **env}
    return subprocess.run([sys.executable, "-m", "muse.cli", *args], capture_output=True, text=True,
                          timeout=GUARD_S, cwd=tmp_path, env=full)


def config(tmp_path, **sections) -> str:
    data = {"storage": {"root": str(tmp_path / "root")}, "source": {"paths": [str(tmp_path / "urls.parquet")]},
            **sections}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(data))
    return str(tmp_path / "pipeline.yaml")


def one_line_error(out, *needles) -> str:
    """Exit 2, exactly one stderr line starting `muse <command>: `, no traceback, all needles in it."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def fake_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # preflight looks for it; the hub check fails first
    return folder


def fake_image_shard(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    (root / "images/00000.parquet").write_bytes(b"")  # completed = parquet + stats present
    (root / "images/00000_stats.json").write_text("{}")


def test_version_and_help_name_the_sections(tmp_path):
    out = muse(tmp_path, "--version")
    assert out.returncode == 0 and out.stdout.startswith("muse ") and out.stdout.split()[1][0].isdigit()
    for cmd, sections in [("download", "storage, source, download"), ("encode", "storage, encode"),
                          ("train", "model, train"), ("sample", "sample"), ("eval", "eval"), ("run", "all")]:
        out = muse(tmp_path, cmd, "--help")
        assert out.returncode == 0 and "Reads config sections:" in out.stdout and sections in out.stdout, cmd
        assert "--debug" in out.stdout


def test_sample_without_checkpoint_says_so_before_loading_t5(tmp_path):
    out = muse(tmp_path, "sample", "--config", config(tmp_path), "--prompt", "a red circle", "--out", "x.png")
    one_line_error(out, "muse sample: no checkpoint", "run 'muse'", "train first", "--checkpoint")


def test_sample_with_unreachable_hub_names_the_model_and_the_ways_out(tmp_path):
    ck = fake_checkpoint(tmp_path / "ck")
    args = ("sample", "--config", config(tmp_path), "--prompt", "x", "--checkpoint", str(ck), "--out", "x.png")
    line = one_line_error(muse(tmp_path, *args), "muse sample: encode.text_model='google/t5-v1_1-base'",
                          f"{HOST} cannot be resolved", "local folder", "HF_HUB_OFFLINE=1", "network access")
    assert str(tmp_path / "hf") in line  # the cache it looked in
    one_line_error(muse(tmp_path, *args, HF_HUB_OFFLINE="1"), "encode.text_model='google/t5-v1_1-base'",
                   "HF_HUB_OFFLINE=1 is set", "unset HF_HUB_OFFLINE")


def test_debug_adds_the_traceback(tmp_path):
    out = muse(tmp_path, "sample", "--config", config(tmp_path), "--prompt", "x", "--debug")
    assert out.returncode == 2 and "Traceback" in out.stderr and "UsageError" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("muse sample: no checkpoint")
    out = muse(tmp_path, "sample", "--config", config(tmp_path), "--prompt", "x", MUSE_DEBUG="1")
    assert out.returncode == 2 and "Traceback" in out.stderr


def test_encode_on_an_empty_root_asks_for_a_download(tmp_path):
    (tmp_path / "root").mkdir()
    one_line_error(muse(tmp_path, "encode", "--config", config(tmp_path)),
                   "muse encode: no image shards in", "run `muse download` first")
    one_line_error(muse(tmp_path, "encode", "--config", config(tmp_path), "--set", f"storage.root={tmp_path / 'nope'}"),
                   "storage.root=", "no such folder")


def test_encode_checks_every_hub_model_before_loading_one(tmp_path):
    fake_image_shard(tmp_path / "root")
    text = tmp_path / "t5"
    text.mkdir()  # a local text model passes; the VQ on the hub is what fails
    one_line_error(muse(tmp_path, "encode", "--config", config(tmp_path), "--set", f"encode.text_model={text}"),
                   "muse encode: encode.vq_model='amused/amused-256'", "cannot be resolved")


def test_run_without_url_list_says_where_laion_lists_come_from(tmp_path):
    one_line_error(muse(tmp_path, "run", "--config", config(tmp_path)),
                   "muse run: source.paths: file not found", "urls.parquet", "LAION", "URL", "TEXT",
                   "--set source.max_samples=1000", "docs/download.md")


def test_train_and_eval_without_encoded_data(tmp_path):
    (tmp_path / "root").mkdir()
    one_line_error(muse(tmp_path, "train", "--config", config(tmp_path)), "muse train: no encoded dataset",
                   "_MANIFEST.json", "muse encode")
    one_line_error(muse(tmp_path, "eval", "--config", config(tmp_path), "--set", "train.eval_holdout=0"),
                   "muse eval: no eval slice", "train.eval_holdout")
    # the default slice (0.001) is there: the data is what is missing
    one_line_error(muse(tmp_path, "eval", "--config", config(tmp_path)), "muse eval: no encoded dataset")


def test_unusable_storage_root_and_output(tmp_path):
    (tmp_path / "afile").write_text("x")
    one_line_error(muse(tmp_path, "download", "--config", config(tmp_path), "--set",
                        f"storage.root={tmp_path / 'afile' / 'root'}"), "muse download: storage.root=", "is a file")
    ck = fake_checkpoint(tmp_path / "ck")
    one_line_error(muse(tmp_path, "sample", "--config", config(tmp_path), "--prompt", "x", "--checkpoint", str(ck),
                        "--out", str(tmp_path / "afile" / "x.png")), "muse sample: sample.out=", "is a file")
    one_line_error(muse(tmp_path, "sample", "--config", config(tmp_path), "--prompts-file", "nope.txt"),
                   "sample.prompts_file=nope.txt: file not found")


def test_bad_config_is_one_line(tmp_path):
    out = muse(tmp_path, "download", "--config", config(tmp_path), "--set", "train.grad_acum=3",
               "--set", "train.lr=-1")
    line = one_line_error(out, "muse download: invalid config", "train.grad_acum: unknown key", "train.lr:")
    assert "; train.lr:" in line or "; train.grad_acum:" in line  # both keys, on the one line


def test_unexpected_errors_keep_their_traceback(capsys):
    from muse.cli import report

    def boom():
        raise KeyError("a bug, not a user mistake")

    try:
        boom()
    except KeyError as err:
        assert report("muse encode", err, debug=False) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in boom" in err and "KeyError" in err


def test_a_cached_model_loads_when_the_hub_is_unreachable(tmp_path):
    """The way out "fill the cache": a model in the HF cache loads without HF_HUB_OFFLINE and without
    a minute of retries (the hang guard), because the load is told local_files_only."""
    from muse.testing.tiny import build_tiny_t5

    repo = tmp_path / "hf/hub/models--muse-test--tiny-t5"
    build_tiny_t5(repo / "snapshots/0000000000000000000000000000000000000000")
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text("0" * 40)
    code = ("from muse.encode.text import TextEncoder; from muse.hub import hub_reachable; "
            "assert not hub_reachable(); enc = TextEncoder.from_pretrained('muse-test/tiny-t5'); "
            "print(enc.encode(['a red circle'])[0].shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=GUARD_S,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                              "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"https://{HOST}"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("(") and "Retrying" not in out.stderr


def test_train_resume_from_a_missing_checkpoint(tmp_path):
    from muse.config import load_config
    from muse.layout import SCHEMA_VERSION
    from muse.storage import Storage

    path = config(tmp_path)
    storage = Storage.from_config(load_config(path))
    storage.write_json(f"encoded/{load_config(path).encode.version()}/_MANIFEST.json",  # its presence and version
                       {"schema_version": SCHEMA_VERSION, "shards": []})                 # are all that is checked
    one_line_error(muse(tmp_path, "train", "--config", path, "--resume", "checkpoints/muse/step-00000100"),
                   "muse train: --resume checkpoints/muse/step-00000100: no checkpoint there", "trainer.pt missing")

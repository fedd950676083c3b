"""What every command checks before it loads a model: seconds, not minutes, to a one-line error.

`check(command, cfg, args)` looks at what costs milliseconds: the storage root (there, a
folder, writable), the command's inputs (source lists, image shards, the encoded manifest,
checkpoints, the prompts file), where its output goes, and whether each hub model it will
load can come (`muse.hub`). A problem raises `UsageError` (or the owning module's own
error: `SourceError`, `DataError`, `ConfigError`, `HubUnavailable`), whose message says what
is wrong and what to do; `muse.cli` prints it as one line and exits 2.

`muse run` calls `check("download", ...)` and `check_models` for every later phase first,
then each later phase's own check just before it runs (its inputs exist only by then).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from muse.storage import Storage

REMOTE_DEADLINE_S = 30.0


class UsageError(ValueError):
    """A user mistake that the command can name: what is wrong and what to do."""


# ----------------------------------------------------------------------------- storage

def _writable(path: Path, key: str) -> None:
    """`path` (existing or not) can be created/written: its nearest existing ancestor is a writable folder."""
    p = path.expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise UsageError(f"{key}: {p} is a file, not a folder: choose another location")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UsageError(f"{key}: {p} is not writable by this user: choose a writable location")


def _remote_root_exists(storage: Storage) -> bool:
    """The bucket of a remote root exists; bounded, since an unreachable endpoint retries for long."""
    bucket = storage.root.split("/", 1)[0]
    result: list = []

    def probe():
        try:
            result.append(storage.fs.exists(bucket))
        except Exception as e:  # noqa: BLE001 - any failure here is "not reachable", reported with its reason
            result.append(e)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(REMOTE_DEADLINE_S)
    where = f"storage.root={storage.url()}"
    if not result:
        raise UsageError(f"{where}: no answer within {REMOTE_DEADLINE_S:.0f} s: check the network and credentials")
    if isinstance(result[0], Exception):
        err = result[0]
        raise UsageError(f"{where}: not reachable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): "
                         "check the network, credentials and storage.gcs_project")
    if not result[0]:
        raise UsageError(f"{where}: bucket {bucket!r} does not exist: create it or fix storage.root")
    return True


def storage_root(cfg, must_exist: bool) -> Storage:
    """The configured root, reachable and writable; `must_exist` for commands that read from it."""
    storage = Storage.from_config(cfg)
    if not storage.is_local:
        _remote_root_exists(storage)
        return storage
    root = Path(storage.root)
    if must_exist and not root.is_dir():
        raise UsageError(f"storage.root={root}: no such folder: run `muse download` first, "
                         "or set storage.root to the folder that holds your data")
    _writable(root, f"storage.root={root}")
    return storage


# ----------------------------------------------------------------------------- inputs

def image_shards(storage: Storage) -> list[int]:
    from muse.layout import IMAGES, done_shards

    shards = done_shards(storage, IMAGES)
    if not shards:
        raise UsageError(f"no image shards in {storage.url('images')}: run `muse download` first, "
                         "or set storage.root to the root that holds images/")
    return shards


def manifest(cfg, storage: Storage) -> dict:
    from muse.layout import dataset_dir, read_manifest  # DataError: names the file and says `muse encode`

    return read_manifest(storage, dataset_dir(cfg))


def checkpoint_ref(storage: Storage, ref: str | None, run_name: str, flag: str) -> None:
    """The checkpoint `muse.sample.load_checkpoint_model` would load exists (config.json present)."""
    from muse import checkpoint

    if ref and (Path(ref) / "config.json").is_file():
        return
    rel = storage.relative(ref) if ref else checkpoint.latest(storage, run_name)
    if rel is None and ref:
        raise UsageError(f"{flag} {ref}: not a checkpoint folder (no config.json) and not under "
                         f"storage.root {storage.url()}: pass a checkpoints/<run>/step-N folder")
    if rel is None:
        raise UsageError(f"no checkpoint: run {run_name!r} has none in {storage.url(checkpoint.run_dir(run_name))} "
                         f"(train first, or pass {flag} DIR)")
    if not storage.exists(f"{rel}/config.json"):
        raise UsageError(f"no checkpoint: {storage.url(rel)} has no config.json "
                         f"(train first, or pass {flag} DIR)")


def sample_output(storage: Storage, out: str) -> None:
    """`sample.out` lands under the root (relative or a URL/path inside it) or in a writable local folder."""
    if storage.relative(out) is not None:
        if storage.is_local:
            _writable(Path(storage.path(storage.relative(out))).parent, f"sample.out={out}")
        return
    if "://" in out:
        raise UsageError(f"sample.out={out}: a URL outside storage.root {storage.url()}: "
                         "give a path under the root or a local file")
    _writable(Path(out).parent, f"sample.out={out}")


def prompts_file(path: str | None) -> None:
    if path and not Path(path).is_file():
        raise UsageError(f"sample.prompts_file={path}: file not found: give a text file with one prompt per line")


# ----------------------------------------------------------------------------- models

def models(cfg, phase: str) -> list:
    """The `muse.config.ModelRef` of every pretrained model `phase` loads, revision included: the
    cache holds a model at a commit, so the check looks for the one the load will ask for."""
    from muse.config import ModelRef

    e = cfg.encode
    if phase == "encode":
        return e.encoder_refs()
    if phase == "sample":
        return [e.text_ref, e.superres_vq_ref if cfg.sample.superres_checkpoint else e.vq_ref]
    if phase == "eval":
        return [ModelRef(key="eval.clip_model", path=cfg.eval.clip_model), e.vq_ref]
    return []


def check_models(cfg, phases: list[str]) -> None:
    """Every hub model the phases load can come (local, cached, or the hub resolves): HubUnavailable."""
    from muse.hub import hub_kwargs

    for phase in phases:
        for ref in models(cfg, phase):
            hub_kwargs(ref.path, ref.key, ref.subfolder, ref.revision)


# ----------------------------------------------------------------------------- commands

def _download(cfg, args) -> None:
    from muse.download.sources import expand_sources  # SourceError: the file, and where lists come from

    storage_root(cfg, must_exist=False)
    expand_sources(cfg.source.paths, cfg.storage.gcs_project)
    if cfg.storage.work_dir:
        _writable(Path(cfg.storage.work_dir), f"storage.work_dir={cfg.storage.work_dir}")


def _encode(cfg, args) -> None:
    from muse.encode.shards import plan_encode
    from muse.layout import ENCODERS, dataset_dir

    storage = storage_root(cfg, must_exist=True)
    image_shards(storage)
    if plan_encode(cfg, storage) or not storage.exists(f"{dataset_dir(cfg)}/{ENCODERS}"):
        check_models(cfg, ["encode"])  # all done already: no model is loaded, none needs checking


def _train(cfg, args) -> None:
    from muse import checkpoint

    storage = storage_root(cfg, must_exist=True)
    manifest(cfg, storage)
    train_settings(cfg)
    resume = getattr(args, "resume", "latest")
    if resume not in ("latest", "none"):
        try:  # the trainer resolves it the same way, but only after torchrun has started
            checkpoint.resolve(storage, cfg.train.run_name, resume)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"{e}: pass a checkpoints/<run>/step-N folder, latest or none") from None


def train_settings(cfg) -> None:
    """What the trainer would refuse at start, checked before torchrun launches (or a download begins)."""
    from muse import tracking

    tracking.require(cfg)  # the config itself was validated at load (num_workers vs loader_streams)


def _sample(cfg, args) -> None:
    s = cfg.sample
    storage = Storage.from_config(cfg)
    if not storage.is_local:
        _remote_root_exists(storage)
    prompts_file(s.prompts_file)
    checkpoint_ref(storage, s.checkpoint, cfg.train.run_name, "--checkpoint")
    if s.superres_checkpoint:
        checkpoint_ref(storage, s.superres_checkpoint, cfg.train.run_name, "--superres-checkpoint")
    sample_output(storage, s.out)
    check_models(cfg, ["sample"])


def _eval(cfg, args) -> None:
    if cfg.model.kind != "base":
        raise UsageError("muse eval covers the base model (model.kind=base): evaluate the base run "
                         "that feeds the super-resolution model")
    if not cfg.train.eval_holdout:
        raise UsageError("no eval slice: set train.eval_holdout (e.g. 0.01) before training, "
                         "so the trainer keeps those rows out")
    storage = storage_root(cfg, must_exist=True)
    manifest(cfg, storage)
    checkpoint_ref(storage, getattr(args, "checkpoint", None), cfg.train.run_name, "--checkpoint")
    check_models(cfg, ["eval"])


CHECKS = {"download": _download, "encode": _encode, "train": _train, "sample": _sample, "eval": _eval}


def check(command: str, cfg, args=None) -> None:
    """The cheap checks of one phase; raises a one-line error (see the module docstring)."""
    CHECKS[command](cfg, args)


def check_run(cfg, args=None) -> None:
    """`muse run` before its download: what can be known now about every phase."""
    _download(cfg, args)
    train_settings(cfg)
    check_models(cfg, ["encode", "sample"])

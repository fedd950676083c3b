"""What identifies the weights an encoder loaded, so that one dataset version never mixes two sets.

The dataset version hashes the encode settings (model names, paths, revisions), which are known
before anything loads. The same name can hold other weights later: a local folder rebuilt in
place, or a hub id whose newest commit moves. So each loaded model also gets a fingerprint,
recorded in the version's `_ENCODERS.json` with the first shard and compared before any
further shard is added (`muse/encode/shards.py`):

- a local folder: "sha256:<hex>" over the folder's files (name and content of each; not
  sub-folders, which hold other models; not *.md or hidden files, which change no value);
- a hub id: "hub:<repo>@<commit>", the commit the load resolved to (from the HF cache, where
  the load just put it), whether `*_revision` pinned it or not.

Hashing reads every weight file once per process (about 2 s per GB).
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def local_fingerprint(folder: str | Path) -> str:
    """sha256 over (name, sha256 of content) of each file directly in `folder`, sorted by name."""
    files = sorted(p for p in Path(folder).iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix != ".md")
    if not files:
        raise FileNotFoundError(f"{folder}: no model files to fingerprint")
    outer = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        outer.update(f"{f.name}\0{digest}\n".encode())
    return f"sha256:{outer.hexdigest()}"


def hub_commit(repo_id: str, subfolder: str | None, revision: str | None) -> str:
    """The commit of `repo_id` that the HF cache resolves `revision` to (after a load put it there)."""
    from huggingface_hub import try_to_load_from_cache

    filename = f"{subfolder}/config.json" if subfolder else "config.json"
    path = try_to_load_from_cache(repo_id, filename, revision=revision)
    if not isinstance(path, str):
        raise FileNotFoundError(f"{repo_id}@{revision or 'main'}: {filename} is not in the Hugging Face cache "
                                "after loading it; cannot tell which commit was used")
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1]  # <cache>/models--org--name/snapshots/<commit>/...


def weights_fingerprint(name_or_path: str, subfolder: str | None, revision: str | None, key: str) -> str:
    """The fingerprint of the model `key` names (after it has loaded). `key`: the config key, for errors."""
    local = Path(name_or_path).expanduser()
    if local.exists():
        if revision is not None:
            raise ValueError(f"{key}={name_or_path!r} is a local folder, so its revision ({revision!r}) "
                             "means nothing; set the revision to null (local weights are fingerprinted "
                             "by content)")
        return local_fingerprint(local / subfolder if subfolder else local)
    return f"hub:{name_or_path}@{hub_commit(name_or_path, subfolder, revision)}"


def encoder_changes(recorded: dict, current: dict) -> list[str]:
    """One phrase per model whose fingerprint differs, naming its config key ([] = the same weights)."""
    return [f"encode.{k}: recorded {recorded.get(k)}, loaded now {current.get(k)}"
            for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]

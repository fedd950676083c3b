"""Hugging Face hub access for the encoders: fail in a second, in one line, when a model cannot come.

transformers and diffusers retry an unresolvable hub host for about a minute before they
give up with a long traceback. Before a model named by a hub id is loaded, `hub_kwargs`
looks at what is there: a local folder needs nothing; with `HF_HUB_OFFLINE=1` the cache must
hold the model; otherwise the hub host must resolve (a DNS lookup, bounded by a deadline),
or, when it does not, the cache must hold the model and the load is told
`local_files_only=True`, which skips the retries. When none of these holds it raises
`HubUnavailable`, whose message names the config key, the model id and the ways out.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

DNS_DEADLINE_S = 5.0  # a resolver that does not answer in 5 s will not serve a model download either


class HubUnavailable(RuntimeError):
    """A hub model is neither local nor cached and the hub cannot be reached; the message says what to do."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_host() -> str:
    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT


@functools.lru_cache(maxsize=None)
def _resolves(host: str) -> bool:
    """Whether `host` resolves within DNS_DEADLINE_S (getaddrinfo has no timeout of its own)."""
    result: list[bool] = []

    def lookup():
        try:
            socket.getaddrinfo(host, 443)
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=lookup, daemon=True)
    t.start()
    t.join(DNS_DEADLINE_S)
    return bool(result and result[0])


def hub_reachable() -> bool:
    """Best cheap guess that a download could work: the host resolves, or a proxy will resolve it."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    return _resolves(hub_host())


def cached(repo_id: str, subfolder: str | None = None, revision: str | None = None) -> bool:
    """Whether the HF cache holds the model's config.json (what every from_pretrained reads first)."""
    from huggingface_hub import try_to_load_from_cache

    filename = f"{subfolder}/config.json" if subfolder else "config.json"
    try:
        return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)
    except ValueError:  # not a valid repo id (e.g. a missing local path): cannot be in the cache
        return False


def hub_kwargs(name_or_path: str, key: str, subfolder: str | None = None, revision: str | None = None) -> dict:
    """Extra from_pretrained kwargs for `name_or_path` ({} or local_files_only), or HubUnavailable."""
    if Path(name_or_path).expanduser().exists():
        return {}
    if _offline():
        if cached(name_or_path, subfolder, revision):
            return {}
        raise HubUnavailable(_message(name_or_path, key, "HF_HUB_OFFLINE=1 is set"))
    if hub_reachable():
        return {}
    if cached(name_or_path, subfolder, revision):
        return {"local_files_only": True}  # the cached copy, without a minute of retries
    raise HubUnavailable(_message(name_or_path, key, f"the hub host {hub_host()} cannot be resolved"))


def pin(revision: str | None) -> dict:
    """from_pretrained kwargs for a hub revision (none when unpinned: each library's own default)."""
    return {"revision": revision} if revision else {}


def _message(name: str, key: str, why: str) -> str:
    from huggingface_hub import constants

    network = (f"or unset HF_HUB_OFFLINE on a machine with access to {hub_host()}" if _offline()
               else f"or give this machine network access to {hub_host()}")
    return (f"{key}={name!r} is not a local folder and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and {why}: set {key} to a local folder holding the model, "
            f"or fill the cache where there is network and run with HF_HUB_OFFLINE=1, {network}")

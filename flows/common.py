"""Config loading, retry policy and artifacts shared by the flows."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from prefect import get_run_logger  # noqa: E402
from prefect.artifacts import create_table_artifact  # noqa: E402
from prefect.states import Failed, State  # noqa: E402

from muse.config import ConfigError, PipelineConfig, load_config  # noqa: E402
from muse.transient import is_transient  # noqa: E402

RETRY_DELAYS = [5, 30, 120]


def cfg_from(config_path: str, overrides: list[str] | None) -> PipelineConfig:
    return load_config(config_path, list(overrides or []))


def user_error(config_path: str, problem: str) -> State:
    """A Failed state for a mistake the user fixes in the config (a URL list that is not there),
    logged as one error line: a flow returns it instead of raising, so the run's log shows the
    line (the key, the file, what to do) and no traceback."""
    message = f"{config_path}: {problem}"
    if problem.startswith("source.paths"):  # what to do on this run, from the UI or the CLI
        message += (". For this run: give config_path a config whose source.paths lists your URL files, "
                    "or add the override \"source.paths=['<file or glob>']\"")
    get_run_logger().error(message)
    return Failed(message=message)


def missing_sources(cfg, config_path: str) -> State | None:
    """None when every `source.paths` entry exists, else `user_error` naming the missing one."""
    from muse.download.sources import SourceError, expand_sources

    try:
        expand_sources(cfg.source.paths, cfg.storage.gcs_project)
    except SourceError as exc:
        return user_error(config_path, str(exc))
    return None


def transient(task, task_run, state) -> bool:
    """retry_condition_fn: retry only the transient errors of `muse.transient` (network, GCS
    429/5xx, the download deadline); bad data, bugs and out-of-memory fail at once."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classification only
        return is_transient(exc)
    return False


def stats_table(key: str, rows: list[dict], description: str) -> None:
    """A table artifact (shown in the UI); keys must be lowercase-dashed."""
    create_table_artifact(key=key, table=rows, description=description)


__all__ = ["ConfigError", "PipelineConfig", "cfg_from", "missing_sources", "user_error", "transient", "stats_table",
           "RETRY_DELAYS"]

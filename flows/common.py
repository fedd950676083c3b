"""Config loading, retry policy and artifacts shared by the flows."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from prefect.artifacts import create_table_artifact  # noqa: E402

from muse.config import ConfigError, PipelineConfig, load_config  # noqa: E402
from muse.transient import is_transient  # noqa: E402

RETRY_DELAYS = [5, 30, 120]


def cfg_from(config_path: str, overrides: list[str] | None) -> PipelineConfig:
    return load_config(config_path, list(overrides or []))


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


__all__ = ["ConfigError", "PipelineConfig", "cfg_from", "transient", "stats_table", "RETRY_DELAYS"]

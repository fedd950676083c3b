"""A `prefect.yaml` pull step that finds this repository when a flow run starts, not at deploy time.

`{{ $MUSE_PIPELINE_DIR }}` in prefect.yaml is filled in by `prefect deploy` (the laptop's
path would reach the GPU pool's image). This step reads the variable on the worker, when the
run starts, with the images' folder as the default.
"""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_DIR = "/opt/muse-pipeline"  # WORKDIR of docker/Dockerfile


def set_code_directory(default: str = IMAGE_DIR) -> dict:
    """chdir to $MUSE_PIPELINE_DIR (read now, on the worker) or `default`; returns {"directory": ...}."""
    directory = os.environ.get("MUSE_PIPELINE_DIR") or default
    if not (Path(directory) / "flows").is_dir():
        raise FileNotFoundError(f"{directory} does not hold this repository (no flows/ folder): set "
                                f"MUSE_PIPELINE_DIR in the worker's environment or the pool's job variables")
    os.chdir(directory)
    return {"directory": directory}

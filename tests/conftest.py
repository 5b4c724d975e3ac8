"""Shared fixtures: the reference data in ../shared (tests that need it skip without it)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
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


@contextlib.contextmanager
def serving(served):
    """`llamette serve` for a ServedModel on a free port of 127.0.0.1, on a thread; yields its
    base URL."""
    import uvicorn

    from llamette.server import create_app, listen

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(served), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()

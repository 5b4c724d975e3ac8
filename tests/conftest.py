"""Shared fixtures: the reference data in ../shared (tests that need it skip without it)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
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


def tiny_llama(n_kv_heads: int, tied: bool, seed: int):
    """A random transformers LlamaForCausalLM small enough to build in a test (skips without
    torch and transformers, the test extra's references)."""
    torch = pytest.importorskip(
        "torch", reason="torch is a test dependency (pip install -e .[test])"
    )
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1.0, so that a swapped norm shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
    return model


def transformers_logits(model, tokens: list[int]) -> np.ndarray:
    """A transformers model's float32 logits (len(tokens), vocab) for one sequence."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()

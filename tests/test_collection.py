"""The test suite itself: it collects on a machine without the optional references."""

import subprocess
import sys
from pathlib import Path

OPTIONAL = (
    "torch",
    "transformers",
    "llama_cpp",
    "openai",
    "httpx",
    "jsonschema",
    "prometheus_client",
)


def test_every_module_collects_without_the_optional_references():
    """Tests that need torch, transformers, llama-cpp-python, openai, httpx, jsonschema or
    prometheus_client skip, saying so, instead of breaking the collection of the whole suite."""
    tests = Path(__file__).resolve().parent
    blocked = f"import sys; sys.modules.update(dict.fromkeys({OPTIONAL!r}))"  # import fails
    run = (
        f"{blocked}; import pytest; sys.exit(pytest.main(['--collect-only', '-q', {str(tests)!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, cwd=tests)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

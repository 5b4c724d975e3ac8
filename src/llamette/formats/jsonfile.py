"""The JSON files beside checkpoints (params.json, config.json), read with one-line errors."""

from __future__ import annotations

import json

from llamette.errors import LlametteError


def read_json_object(path: str) -> dict:
    """A JSON file that must hold an object."""
    try:
        with open(path) as f:
            value = json.load(f)
    except OSError as error:
        raise LlametteError(f"{path}: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LlametteError(f"{path}: not valid JSON") from None
    if not isinstance(value, dict):
        raise LlametteError(f"{path}: not a JSON object")
    return value

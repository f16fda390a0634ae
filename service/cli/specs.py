"""The user's JSON files (job specs, sweeps) read for a command, with errors that name the
file and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import fail


def _reason(err: dict[str, Any]) -> str:
    """A pydantic error's message, without the "Value error, " prefix on our own checks."""
    original = err.get("ctx", {}).get("error")
    return str(original) if isinstance(original, ValueError) else err["msg"]


def read_json_object(path: str, what: str) -> dict[str, Any]:
    """A JSON object from ``path``, or exit with an error naming the file and the problem."""
    p = Path(path)
    if not p.is_file():
        fail(f"{what} file not found: {path}")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        fail(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
    if not isinstance(raw, dict):
        fail(f"{path}: a {what} is a JSON object, got {type(raw).__name__}")
    return raw


def load_spec_file(path: str, overrides: dict[str, Any] | None = None):
    """Read and validate a TrainSpec JSON file, with errors that name the file and field."""
    import pydantic

    from workers import TrainSpec

    raw = read_json_object(path, "spec")
    raw.update(overrides or {})
    try:
        return TrainSpec.model_validate(raw)
    except pydantic.ValidationError as e:
        lines = [
            f"{'.'.join(str(x) for x in err['loc']) or 'spec'}: {_reason(err)}"
            for err in e.errors()
        ]
        fail(f"{path}: invalid spec:\n  " + "\n  ".join(lines))

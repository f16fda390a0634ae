"""How a ``nestor`` command fails: one line on stderr and exit status 2 (`fail`), and an API
or local file error turned into that line (`api_errors`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

T = TypeVar("T")


def fail(message: str) -> NoReturn:
    """Print ``nestor: error: MESSAGE`` on stderr and exit with status 2."""
    print(f"nestor: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def api_errors(fn: Callable[[], T]) -> T:
    """Run ``fn()``; an API error or a local file's (a download's destination, a package's
    source) is a one-line message and exit status 2. A service that cannot be reached is
    ``main()``'s."""
    from ..client import NestorError

    try:
        return fn()
    except NestorError as e:
        fail(f"{e.status}: {json.dumps(e.detail)}")
    except OSError as e:
        fail(str(e))

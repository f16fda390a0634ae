"""The ``nestor`` command line: the parser built from the command modules, and the dispatch.

Commands by what they talk to: `train` (local training, no service), `process` (the
service's own process and database: serve, stop, db) and `api` (a running service over its
REST API; `webhooks` too). Errors become one line and exit status 2 in `errors`.
"""

from __future__ import annotations

import argparse
import os
import sys

import httpx

from . import api, process, train, webhooks
from .errors import fail


def build_parser() -> argparse.ArgumentParser:
    """The ``nestor`` parser; each command sets ``func``, its ``cmd_*(args) -> int``."""
    parser = argparse.ArgumentParser(prog="nestor", description="Nestor: large-batch training")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train, process, api, webhooks):  # the order of `nestor --help`
        module.register(sub)
    return parser


def _has_request(e: httpx.TransportError) -> bool:
    try:
        e.request  # noqa: B018 (a property that raises when the error was made without one)
    except RuntimeError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """Run one ``nestor`` command; returns its exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except httpx.TransportError as e:  # refused, unresolvable, timed out: one line, no traceback
        where = e.request.url if _has_request(e) else getattr(args, "url", None)
        fail(f"cannot reach the Nestor service at {where}: {e or type(e).__name__}")
    except BrokenPipeError:  # `nestor jobs | head`: the reader left, which is not an error
        # Python's documented way out: point stdout at devnull so the exit's flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

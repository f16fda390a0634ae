"""The commands that run or change the service's own process and database: ``nestor serve``,
``nestor stop`` and ``nestor db`` (migrations). They read the settings and the database
directly; none of them goes through the REST API."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import time

from .errors import fail


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve``, ``stop`` and ``db`` to the ``nestor`` parser."""
    serve = sub.add_parser("serve", help="run the service (API, scheduler, embedded Ray)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="default 8000")
    serve.add_argument("--database-url", help="e.g. postgresql+psycopg://u:p@host/nestor")
    serve.add_argument("--ray-address", help="existing Ray cluster (default: start one)")
    serve.add_argument(
        "--isolation",
        choices=("auto", "on", "off"),
        help="sandbox each job's processes (default auto: on the Ray the service starts, "
        "where bubblewrap runs; README: what a job can and cannot touch)",
    )
    serve.add_argument(
        "--api-only",
        action="store_true",
        help="serve the API and dashboard without a scheduler or Ray (another replica of a "
        "service whose scheduler runs elsewhere on the same database)",
    )
    serve.set_defaults(func=cmd_serve)

    stop = sub.add_parser(
        "stop",
        help="stop the service, its embedded Ray and the jobs on it (recorded as cancelled)",
    )
    stop.add_argument("--database-url", help="the service's database (default: NESTOR_HOME's)")
    stop.add_argument("--ray-address", help="the service runs on this external cluster")
    stop.add_argument("--timeout", type=float, default=90, help="seconds to wait for the service")
    stop.set_defaults(func=cmd_stop)

    db = sub.add_parser("db", help="database migrations")
    db.add_argument("action", choices=["upgrade", "downgrade"])
    db.add_argument("revision", nargs="?", help="default: head / base")
    db.add_argument("--database-url")
    db.set_defaults(func=cmd_db)


def _serve_settings(args: argparse.Namespace):
    """The service's Settings: the environment's, with the flags given on top."""
    from ..settings import Settings

    overrides = {
        k: v
        for k, v in {
            "host": getattr(args, "host", None),
            "port": getattr(args, "port", None),
            "database_url": args.database_url,
            "ray_address": getattr(args, "ray_address", None),
            "isolation": getattr(args, "isolation", None),
        }.items()
        if v is not None
    }
    return Settings(**overrides)


def _listen(host: str, port: int) -> socket.socket:
    """The service's listening socket, bound before anything else starts (a busy port must
    not leave a scheduler and a Ray cluster running behind a failed start)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it every response waited out Nagle's algorithm and a delayed ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        fail(f"cannot listen on {host}:{port}: {e.strerror} (is another service using it?)")
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    """Lease, port, then the app: a second `nestor serve` on the same database, or on a busy
    port, exits with a clear error before it starts a scheduler or a Ray cluster."""
    import uvicorn

    from ..app import create_app
    from ..lease import LeaseHeld
    from ..lease import acquire as acquire_lease

    settings = _serve_settings(args)
    lease = None
    if not args.api_only:
        try:
            lease = acquire_lease(settings.db_url)
        except LeaseHeld as e:
            fail(str(e))
    try:
        sock = _listen(settings.host, settings.port)
    except SystemExit:
        if lease is not None:
            lease.release()
        raise
    app = create_app(
        settings, scheduler=not args.api_only, announce=True, lease=lease, freeze_heap=True
    )
    # A thread that wants the GIL waits up to the switch interval for it; requests make many
    # short database calls, each releasing and retaking it, and at the default 5 ms a few
    # busy threads (ingest, stream polls) turned a 5 ms request into 50 ms.
    sys.setswitchinterval(0.001)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=10,  # open event streams end; nobody waits for ever
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after shutting down
        return 130
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop everything at once: the service, its embedded Ray and the jobs running on it
    (recorded as cancelled). Jobs on an external cluster (--ray-address) go on."""
    from ..lease import LeaseHeld
    from ..lease import acquire as acquire_lease
    from ..stop import stop_everything

    settings = _serve_settings(args)
    lease, signalled = None, None
    deadline = time.time() + args.timeout
    while lease is None:
        try:
            lease = acquire_lease(settings.db_url)
        except LeaseHeld as held:
            if held.host != socket.gethostname() or held.pid is None:
                fail(f"{held}; it does not run on this machine: stop it where it runs")
            if held.pid != signalled:
                print(f"nestor: stopping the service (pid {held.pid})", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(held.pid, signal.SIGTERM)
                signalled = held.pid
            elif time.time() > deadline:
                fail(f"the service (pid {held.pid}) did not stop within {args.timeout:.0f} s")
            time.sleep(0.5)
    try:
        summary = stop_everything(settings)
    finally:
        lease.release()
    print(f"nestor: {summary}", file=sys.stderr)
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    """Upgrade or downgrade the database's schema (Alembic) to a revision."""
    from ..db import downgrade, upgrade
    from ..settings import Settings

    url = args.database_url or Settings().db_url
    if args.action == "upgrade":
        upgrade(url, args.revision or "head")
    else:
        downgrade(url, args.revision or "base")
    print(f"nestor: database {args.action}d ({url.split('@')[-1]})", file=sys.stderr)
    return 0

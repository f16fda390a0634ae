"""The ``nestor`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pydantic


def _fail(message: str) -> None:
    print(f"nestor: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _reason(err: dict[str, Any]) -> str:
    """A pydantic error's message, without the "Value error, " prefix on our own checks."""
    original = err.get("ctx", {}).get("error")
    return str(original) if isinstance(original, ValueError) else err["msg"]


def read_json_object(path: str, what: str) -> dict[str, Any]:
    """A JSON object from ``path``, or exit with an error naming the file and the problem."""
    p = Path(path)
    if not p.is_file():
        _fail(f"{what} file not found: {path}")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        _fail(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
    if not isinstance(raw, dict):
        _fail(f"{path}: a {what} is a JSON object, got {type(raw).__name__}")
    return raw


def load_spec_file(path: str, overrides: dict[str, Any] | None = None):
    """Read and validate a TrainSpec JSON file, with errors that name the file and field."""
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
        _fail(f"{path}: invalid spec:\n  " + "\n  ".join(lines))


def _progress(run_dir: Path, total: int, done: threading.Event) -> None:
    """Follow metrics.jsonl with a progress bar until ``done``."""
    from tqdm import tqdm

    path = run_dir / "metrics.jsonl"
    with tqdm(total=total, unit="step", dynamic_ncols=True) as bar:
        pos = 0
        while True:
            finished = done.is_set()
            if path.exists():
                with open(path) as f:
                    f.seek(pos)
                    for line in f:
                        if not line.endswith("\n"):
                            break
                        pos += len(line)
                        try:
                            rec = json.loads(line)
                        except ValueError:  # a line torn by a crashed attempt
                            continue
                        bar.n = min(total, rec["step"])
                        post = {"loss": rec.get("train_loss")}
                        if rec.get("samples_per_s"):
                            post["samples/s"] = f"{rec['samples_per_s']:.0f}"
                        if rec.get("val_accuracy") is not None:
                            post["val_acc"] = f"{rec['val_accuracy']:.3f}"
                        bar.set_postfix(post, refresh=False)
                        bar.refresh()
            if finished:
                return
            time.sleep(0.5)


def cmd_train(args: argparse.Namespace) -> int:
    overrides = {"num_workers": args.workers} if args.workers else {}
    spec = load_spec_file(args.spec, overrides)
    if args.out:
        run_dir = Path(args.out)
    else:  # pydantic-settings only here: `--local --out` runs where only workers/ can
        from .settings import Settings

        run_dir = Settings().run_root / f"{Path(args.spec).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (run_dir / "result.json").exists():
        _fail(f"{run_dir} already holds a finished run; choose another --out")
    runtime_env, code_dir = None, None
    if args.code:
        spec, code_dir, runtime_env = _local_package(spec, args.code, run_dir)
    elif spec.code:
        _fail(
            f"{args.spec}: the spec names code package {spec.code}; give --code DIR to "
            f"train it here"
        )
    elif spec.requirements:
        runtime_env = {"pip": spec.requirements}
    where = ""
    if args.local:  # the devices are checked before any process starts
        from workers.launcher import (
            LocalDevicesError,
            cuda_device_count,
            local_devices,
            on_this_machine,
        )

        cuda_count = cuda_device_count()
        spec = on_this_machine(spec, cuda_count)
        try:
            backend, devices = local_devices(spec, cuda_count)
        except LocalDevicesError as e:
            _fail(str(e))
        where = f" on {', '.join(dict.fromkeys(devices))} ({backend})"
    print(
        f"nestor: training {spec.describe()} with {spec.optimizer.name}, "
        f"batch {spec.batch_size} over {spec.num_workers} worker(s){where}, "
        f"ZeRO-{spec.zero_stage}; output in {run_dir}",
        file=sys.stderr,
    )
    done = threading.Event()
    bar = threading.Thread(target=_progress, args=(run_dir, spec.max_steps, done), daemon=True)
    bar.start()
    try:
        if args.local:
            from workers.launcher import run_local

            result = run_local(spec, run_dir, code_dir)
        else:
            from workers.launcher import run_on_ray

            result = run_on_ray(
                spec,
                run_dir,
                ray_address=args.ray_address,
                max_failures=spec.max_restarts if args.max_failures is None else args.max_failures,
                runtime_env=runtime_env,
                warm=True,
            )
    except ConnectionError as e:
        _fail(str(e))
    finally:
        done.set()
        bar.join()
    final = result.get("final_metrics", {})
    summary = {k: final[k] for k in ("train_loss", "val_loss", "val_accuracy") if k in final}
    print(
        json.dumps(
            {
                "status": result["status"],
                **summary,
                **(
                    {"reached_target_at_step": result["reached_target_at_step"]}
                    if "reached_target_at_step" in result
                    else {}
                ),
                "params_sha256": result.get("params_sha256"),
                "error": result.get("error"),
            },
            indent=1,
        )
    )
    return 0 if result["status"] == "succeeded" else 1


def _serve_settings(args: argparse.Namespace):
    from .settings import Settings

    overrides = {
        k: v
        for k, v in {
            "host": getattr(args, "host", None),
            "port": getattr(args, "port", None),
            "database_url": args.database_url,
            "ray_address": getattr(args, "ray_address", None),
        }.items()
        if v is not None
    }
    return Settings(**overrides)


def _listen(host: str, port: int):
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
        _fail(f"cannot listen on {host}:{port}: {e.strerror} (is another service using it?)")
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    """Lease, port, then the app: a second `nestor serve` on the same database, or on a busy
    port, exits with a clear error before it starts a scheduler or a Ray cluster."""
    import uvicorn

    from .app import create_app
    from .lease import LeaseHeld
    from .lease import acquire as acquire_lease

    settings = _serve_settings(args)
    lease = None
    if not args.api_only:
        try:
            lease = acquire_lease(settings.db_url)
        except LeaseHeld as e:
            _fail(str(e))
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
    from .lease import LeaseHeld
    from .lease import acquire as acquire_lease
    from .stop import stop_everything

    settings = _serve_settings(args)
    lease, signalled = None, None
    deadline = time.time() + args.timeout
    while lease is None:
        try:
            lease = acquire_lease(settings.db_url)
        except LeaseHeld as held:
            if held.host != socket.gethostname() or held.pid is None:
                _fail(f"{held}; it does not run on this machine: stop it where it runs")
            if held.pid != signalled:
                print(f"nestor: stopping the service (pid {held.pid})", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(held.pid, signal.SIGTERM)
                signalled = held.pid
            elif time.time() > deadline:
                _fail(f"the service (pid {held.pid}) did not stop within {args.timeout:.0f} s")
            time.sleep(0.5)
    try:
        summary = stop_everything(settings)
    finally:
        lease.release()
    print(f"nestor: {summary}", file=sys.stderr)
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from .db import downgrade, upgrade
    from .settings import Settings

    url = args.database_url or Settings().db_url
    if args.action == "upgrade":
        upgrade(url, args.revision or "head")
    else:
        downgrade(url, args.revision or "base")
    print(f"nestor: database {args.action}d ({url.split('@')[-1]})", file=sys.stderr)
    return 0


def _client(args: argparse.Namespace):
    from .client import Client

    return Client(args.url, args.token)


def _api_call(fn) -> int:
    print(json.dumps(_api_errors(fn), indent=1, default=str))
    return 0


def _local_package(spec, directory: str, run_dir: Path):
    """``nestor train --code DIR``: the same package the service would store (``DIR`` zipped,
    what .gitignore ignores left out), as Ray's working_dir, or unpacked for --local."""
    import zipfile

    from .package_pack import pack_dir, package_id

    if not Path(directory).is_dir():
        _fail(f"--code {directory}: not a directory")
    data = pack_dir(Path(directory))
    spec = spec.model_copy(update={"code": package_id(data)})
    run_dir.mkdir(parents=True, exist_ok=True)
    archive = run_dir / "code.zip"
    archive.write_bytes(data)
    code_dir = run_dir / "code"
    with zipfile.ZipFile(archive) as z:
        z.extractall(code_dir)
    env: dict[str, Any] = {"working_dir": str(archive)}
    if spec.requirements:
        env["pip"] = spec.requirements
    return spec, str(code_dir), env


def _with_code(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with ``code`` set to DIR's package, uploaded unless the service has it."""
    if not getattr(args, "code", None):
        return spec
    if not Path(args.code).is_dir():
        _fail(f"--code {args.code}: not a directory")
    package = _client(args).ensure_package(Path(args.code))
    print(f"nestor: code package {package}", file=sys.stderr)
    return {**spec, "code": package}


def cmd_submit(args: argparse.Namespace) -> int:
    spec = load_spec_file(args.spec)
    name = args.name or Path(args.spec).stem
    return _api_call(
        lambda: _client(args).submit(
            _with_code(args, spec.model_dump(mode="json")), name, args.priority
        )
    )


def cmd_jobs(args: argparse.Namespace) -> int:
    from workers.spec import optimizer_label

    jobs = _api_errors(lambda: _client(args).jobs(status=args.status, sweep=args.sweep))
    print(f"{'id':>5}  {'status':<13} {'step':>7}  {'optimizer':<15} {'batch':>6}  name")
    for j in jobs["data"]:
        spec = j["spec"]
        print(
            f"{j['id']:>5}  {j['status']:<13} {j['last_step']:>7}  "
            f"{optimizer_label(spec):<15} {spec['batch_size']:>6}  {j['name']}"
        )
    print(f"({jobs['count']} jobs)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    return _api_call(lambda: _client(args).job(args.id))


def cmd_cancel(args: argparse.Namespace) -> int:
    return _api_call(lambda: _client(args).cancel(args.id))


def _api_errors(fn):
    """Run ``fn()``; an API error or a local file's (a download's destination, a package's
    source) is a one-line message and exit status 2. A service that cannot be reached is
    ``main()``'s."""
    from .client import NestorError

    try:
        return fn()
    except NestorError as e:
        _fail(f"{e.status}: {json.dumps(e.detail)}")
    except OSError as e:
        _fail(str(e))


def cmd_logs(args: argparse.Namespace) -> int:
    """Print the job's log; with -f, follow it until the job ends."""
    client = _client(args)

    def show(page: dict) -> None:
        if page.get("notice"):
            print(page["notice"], file=sys.stderr)
        for line in page["lines"]:
            print(line)
        sys.stdout.flush()

    def run() -> int:
        if args.follow:
            for page in client.follow_logs(args.id, args.since):
                show(page)
            return 0
        since = args.since
        while True:
            page = client.logs(args.id, since, 5000)
            show(page)
            if page["next"] == since or len(page["lines"]) < 5000:
                return 0
            since = page["next"]

    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        return _api_errors(run)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    """Download a job's artifacts (default: the final state and files; --step N: that
    checkpoint's model and optimizer state) with a progress bar."""
    from tqdm import tqdm

    client = _client(args)
    listing = _api_errors(lambda: client.artifacts(args.id))
    if listing.get("deleted_at"):
        _fail(f"job {args.id}'s artifacts were deleted at {listing['deleted_at']}")
    wanted = [
        a
        for a in listing["data"]
        if (a["name"] in args.name if args.name else a["step"] == args.step)
    ]
    if not wanted:
        have = ", ".join(a["name"] for a in listing["data"]) or "none yet"
        _fail(f"job {args.id} has no such artifact (it has: {have})")
    out = Path(args.out or f"job-{args.id}")
    out.mkdir(parents=True, exist_ok=True)
    for a in wanted:
        with tqdm(total=a["size"], unit="B", unit_scale=True, desc=a["name"], leave=True) as bar:

            def progress(done: int, total: int, bar=bar) -> None:
                bar.total = total
                bar.update(done - bar.n)

            path = _api_errors(lambda a=a, p=progress: client.download(args.id, a["name"], out, p))
        print(f"{path}  sha256 {a['sha256']}", file=sys.stderr)
    return 0


def _days(text: str) -> float:
    """'30d', '12h' or a number of days."""
    units = {"d": 1.0, "h": 1 / 24, "w": 7.0}
    try:
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--expires {text!r}: give e.g. 30d, 12h or 2w") from None


def _scopes(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def cmd_users(args: argparse.Namespace) -> int:
    """Users (admins): create one (its first token is printed once), list, disable."""
    client = _client(args)
    if args.action == "create":
        if not args.name:
            _fail("nestor users create NAME")
        made = _api_errors(lambda: client.create_user(args.name, _scopes(args.scope)))
        print(f"user {made['id']} {made['name']}; their token (shown once):", file=sys.stderr)
        print(made["token"])
        return 0
    users = _api_errors(client.users)
    if args.action == "list":
        for u in users:
            state = "disabled" if u["disabled"] else "active"
            print(f"{u['id']:>4}  {u['name']:<20} {state:<9} {u['created_at']}")
        return 0
    match = [u for u in users if args.name in (u["name"], str(u["id"]))]
    if not match:
        _fail(f"no user {args.name!r}")
    done = _api_errors(lambda: client.set_user_disabled(match[0]["id"], args.action == "disable"))
    print(f"user {done['name']}: {'disabled' if done['disabled'] else 'enabled'}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Your tokens: create (the secret is printed once), list, revoke."""
    client = _client(args)
    if args.action == "create":
        made = _api_errors(
            lambda: client.create_token(args.name or "token", _scopes(args.scope), args.expires)
        )
        expiry = f", expires {made['expires_at']}" if made["expires_at"] else ""
        print(
            f"token {made['id']} ({', '.join(made['scopes'])}{expiry}), shown once:",
            file=sys.stderr,
        )
        print(made["token"])
        return 0
    if args.action == "revoke":
        if not args.id:
            _fail("nestor token revoke ID")
        done = _api_errors(lambda: client.revoke_token(int(args.id)))
        print(f"token {done['id']} ({done['name']}) revoked")
        return 0
    for t in _api_errors(lambda: client.tokens(args.all)):
        state = "revoked" if t["revoked"] else "active"
        print(
            f"{t['id']:>4}  {t['name']:<16} {t['user'] or '-':<12} {','.join(t['scopes']):<22} "
            f"{state:<8} last used {t['last_used_at'] or 'never'}; "
            f"expires {t['expires_at'] or 'never'}"
        )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    body = read_json_object(args.file, "sweep")

    def create() -> dict:
        if args.code:  # one package for every trial
            body["base"] = _with_code(args, body.get("base") or {})
        return _client(args).sweep(body)

    return _api_call(create)


def cmd_recipe(args: argparse.Namespace) -> int:
    answer = _api_errors(lambda: _client(args).recipe(args.id, args.batch_size))
    t = answer["target"]
    print(
        f"sweep {answer['sweep_id']}: the lr with the fewest steps to "
        f"{t['metric']} {'>=' if t.get('mode') == 'max' else '<='} {t['value']}, per batch size"
    )
    for r in answer["recipes"]:
        print(f"\n{r['optimizer']}")
        for p in r["points"]:
            print(
                f"  batch {p['batch_size']:>8,}  best lr {p['best_lr']:<10.4g} "
                f"fit {p['fitted_lr']:.4g}"
            )
        if r["exponent"] is None:
            print("  (a fit needs best lrs at two batch sizes or more)")
            continue
        print(
            f"  lr = {r['lr_ref']:.4g} x (batch / {r['batch_ref']:,}) ^ {r['exponent']:.3f}"
            f"  (residual {r['residual']:.3f} decades RMS)"
        )
        if r["suggested_lr"] is not None:
            print(f"  suggested lr at batch {answer['batch_size']:,}: {r['suggested_lr']:.4g}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nestor", description="Nestor: large-batch training")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a job spec now (embedded Ray by default)")
    train.add_argument("spec", help="TrainSpec JSON file (see examples/)")
    train.add_argument("--workers", type=int, help="override num_workers")
    train.add_argument(
        "--ray-address",
        help="an existing Ray cluster: host:port, or 'auto' for the one this machine started "
        "last (default: a private local Ray for this run)",
    )
    train.add_argument("--out", help="run directory (default: NESTOR_HOME/runs/NAME-TIME)")
    train.add_argument(
        "--code",
        metavar="DIR",
        help="your project directory, importable by the spec's factories (zipped as "
        "`nestor submit --code` would, and shipped as Ray's working_dir)",
    )
    train.add_argument(
        "--max-failures",
        type=int,
        default=None,
        help="worker-group restarts from the latest checkpoint (default: the spec's max_restarts)",
    )
    train.add_argument(
        "--local", action="store_true", help="local processes instead of Ray (debugging)"
    )
    train.set_defaults(func=cmd_train)

    serve = sub.add_parser("serve", help="run the service (API, scheduler, embedded Ray)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="default 8000")
    serve.add_argument("--database-url", help="e.g. postgresql+psycopg://u:p@host/nestor")
    serve.add_argument("--ray-address", help="existing Ray cluster (default: start one)")
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

    for name, fn, help_ in [
        ("submit", cmd_submit, "queue a job spec"),
        ("jobs", cmd_jobs, "list jobs"),
        ("show", cmd_show, "show one job"),
        ("cancel", cmd_cancel, "cancel a job"),
        ("sweep", cmd_sweep, "create a sweep from a JSON file"),
        ("recipe", cmd_recipe, "the lr per batch size fitted from a stop_at sweep"),
        ("logs", cmd_logs, "print a job's log (-f: follow it while it runs)"),
        ("download", cmd_download, "download a job's model, optimizer state and files"),
        ("users", cmd_users, "users (admins): create NAME, list, disable NAME, enable NAME"),
        ("token", cmd_token, "your API tokens: create, list, revoke ID"),
    ]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--url", help="service URL (default NESTOR_URL or 127.0.0.1:8000)")
        p.add_argument("--token", help="API token (default NESTOR_TOKEN or the admin file)")
        code_help = (
            "your project directory: zipped (.git, .venv, __pycache__ and what .gitignore "
            "ignores left out), uploaded once, and named as the spec's code package"
        )
        if name == "submit":
            p.add_argument("spec")
            p.add_argument("--name")
            p.add_argument("--priority", type=int, default=0)
            p.add_argument("--code", metavar="DIR", help=code_help)
        elif name == "sweep":
            p.add_argument("file", help="sweep JSON (see examples/)")
            p.add_argument("--code", metavar="DIR", help=code_help + " (shared by every trial)")
        elif name == "recipe":
            p.add_argument("id", type=int, help="the sweep")
            p.add_argument("--batch-size", type=int, help="suggest an lr for this batch size")
        elif name == "jobs":
            p.add_argument("--status")
            p.add_argument("--sweep", type=int)
        elif name == "logs":
            p.add_argument("id", type=int)
            p.add_argument("-f", "--follow", action="store_true", help="stream until it ends")
            p.add_argument("--since", type=int, default=0, help="the first line to show")
        elif name == "users":
            p.add_argument("action", choices=["create", "list", "disable", "enable"])
            p.add_argument("name", nargs="?", help="the user's name (or id)")
            p.add_argument("--scope", default="read,submit", help="the first token's scopes")
        elif name == "token":
            p.add_argument("action", choices=["create", "list", "revoke"])
            p.add_argument("id", nargs="?", help="the token to revoke")
            p.add_argument("--name", help="a name to recognise it by")
            p.add_argument(
                "--scope", default="read,submit", help="read, submit, code, admin (comma-separated)"
            )
            p.add_argument("--expires", type=_days, help="e.g. 30d, 12h (default: never)")
            p.add_argument("--all", action="store_true", help="every user's tokens (admins)")
        elif name == "download":
            p.add_argument("id", type=int)
            p.add_argument("--out", help="directory (default: ./job-ID)")
            p.add_argument("--step", type=int, help="a checkpoint's model and optimizer state")
            p.add_argument("--name", action="append", help="one artifact by name (repeatable)")
        else:
            p.add_argument("id", type=int)
        p.set_defaults(func=fn)
    return parser


def _has_request(e: httpx.TransportError) -> bool:
    try:
        e.request  # noqa: B018 (a property that raises when the error was made without one)
    except RuntimeError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except httpx.TransportError as e:  # refused, unresolvable, timed out: one line, no traceback
        where = e.request.url if _has_request(e) else getattr(args, "url", None)
        _fail(f"cannot reach the Nestor service at {where}: {e or type(e).__name__}")
    except BrokenPipeError:  # `nestor jobs | head`: the reader left, which is not an error
        # Python's documented way out: point stdout at devnull so the exit's flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The commands that talk to a running service over its REST API (`service.client`):
submit, jobs, show, cancel, sweep, recipe, logs, download, users, token. Each takes
``--url`` and ``--token``; none of them imports SQLAlchemy or the service's app."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import api_errors, fail
from .specs import load_spec_file, read_json_object

CODE_HELP = (
    "your project directory: zipped (.git, .venv, __pycache__ and what .gitignore "
    "ignores left out), uploaded once, and named as the spec's code package"
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the REST commands to the ``nestor`` parser."""
    p = _command(sub, "submit", cmd_submit, "queue a job spec")
    p.add_argument("spec")
    p.add_argument("--name")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--code", metavar="DIR", help=CODE_HELP)

    p = _command(sub, "jobs", cmd_jobs, "list jobs")
    p.add_argument("--status")
    p.add_argument("--sweep", type=int)

    _command(sub, "show", cmd_show, "show one job").add_argument("id", type=int)
    _command(sub, "cancel", cmd_cancel, "cancel a job").add_argument("id", type=int)
    resize = _command(sub, "resize", cmd_resize, "resize a running elastic job")
    resize.add_argument("id", type=int)
    resize.add_argument("workers", type=int, help="within the job's num_workers range")

    p = _command(sub, "sweep", cmd_sweep, "create a sweep from a JSON file")
    p.add_argument("file", help="sweep JSON (see examples/)")
    p.add_argument("--code", metavar="DIR", help=CODE_HELP + " (shared by every trial)")

    p = _command(sub, "recipe", cmd_recipe, "the lr per batch size fitted from a stop_at sweep")
    p.add_argument("id", type=int, help="the sweep")
    p.add_argument("--batch-size", type=int, help="suggest an lr for this batch size")

    p = _command(sub, "logs", cmd_logs, "print a job's log (-f: follow it while it runs)")
    p.add_argument("id", type=int)
    p.add_argument("-f", "--follow", action="store_true", help="stream until it ends")
    p.add_argument("--since", type=int, default=0, help="the first line to show")

    p = _command(sub, "download", cmd_download, "download a job's model, optimizer state and files")
    p.add_argument("id", type=int)
    p.add_argument("--out", help="directory (default: ./job-ID)")
    p.add_argument("--step", type=int, help="a checkpoint's model and optimizer state")
    p.add_argument("--name", action="append", help="one artifact by name (repeatable)")

    p = _command(
        sub, "users", cmd_users, "users (admins): create NAME, list, disable NAME, enable NAME"
    )
    p.add_argument("action", choices=["create", "list", "disable", "enable"])
    p.add_argument("name", nargs="?", help="the user's name (or id)")
    p.add_argument("--scope", default="read,submit", help="the first token's scopes")

    p = _command(sub, "token", cmd_token, "your API tokens: create, list, revoke ID")
    p.add_argument("action", choices=["create", "list", "revoke"])
    p.add_argument("id", nargs="?", help="the token to revoke")
    p.add_argument("--name", help="a name to recognise it by")
    p.add_argument(
        "--scope", default="read,submit", help="read, submit, code, admin (comma-separated)"
    )
    p.add_argument("--expires", type=_days, help="e.g. 30d, 12h (default: never)")
    p.add_argument("--all", action="store_true", help="every user's tokens (admins)")


def _command(
    sub: argparse._SubParsersAction,
    name: str,
    fn: Callable[[argparse.Namespace], int],
    help_: str,
) -> argparse.ArgumentParser:
    """A REST command's parser, with the flags every one of them takes."""
    p = sub.add_parser(name, help=help_)
    p.add_argument("--url", help="service URL (default NESTOR_URL or 127.0.0.1:8000)")
    p.add_argument("--token", help="API token (default NESTOR_TOKEN or the admin file)")
    p.set_defaults(func=fn)
    return p


def _client(args: argparse.Namespace):
    from ..client import Client

    return Client(args.url, args.token)


def _api_call(fn: Callable[[], Any]) -> int:
    """Print what ``fn()`` answers as indented JSON."""
    print(json.dumps(api_errors(fn), indent=1, default=str))
    return 0


def _with_code(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with ``code`` set to DIR's package, uploaded unless the service has it."""
    if not getattr(args, "code", None):
        return spec
    if not Path(args.code).is_dir():
        fail(f"--code {args.code}: not a directory")
    package = _client(args).ensure_package(Path(args.code))
    print(f"nestor: code package {package}", file=sys.stderr)
    return {**spec, "code": package}


# ---------------------------------------------------------------------------------- jobs
def cmd_submit(args: argparse.Namespace) -> int:
    """Queue a job spec (with ``--code``: and its project directory)."""
    spec = load_spec_file(args.spec)
    name = args.name or Path(args.spec).stem
    return _api_call(
        lambda: _client(args).submit(
            _with_code(args, spec.model_dump(mode="json")), name, args.priority
        )
    )


def cmd_jobs(args: argparse.Namespace) -> int:
    """The jobs (filtered by --status, --sweep) as a table; under each queued job its place,
    what it waits for and when it should start, under each running job its rate and when it
    should end."""
    from workers.spec import optimizer_label

    jobs = api_errors(lambda: _client(args).jobs(status=args.status, sweep=args.sweep))
    print(f"{'id':>5}  {'status':<13} {'step':>15}  {'optimizer':<22} {'batch':>6}  name")
    now = datetime.now(UTC)
    for j in jobs["data"]:
        spec = j["spec"]
        steps = f"{j['last_step']}/{spec.get('max_steps', '?')}"
        print(
            f"{j['id']:>5}  {j['status']:<13} {steps:>15}  "
            f"{optimizer_label(spec):<22} {spec['batch_size']:>6}  {j['name']}"
        )
        detail = job_timing(j, now)
        if detail:
            print(f"{'':>7}{detail}")
    print(f"({jobs['count']} jobs)")
    return 0


def job_timing(job: dict[str, Any], now: datetime) -> str | None:
    """A queued job's place, reason and start, or a running job's rate and end, in words."""

    def within(when: str | None) -> str | None:
        if not when:
            return None
        return duration((datetime.fromisoformat(when) - now).total_seconds())

    if job["status"] == "queued":
        parts = []
        if job.get("queue_position"):
            parts.append(f"#{job['queue_position']} in the queue")
        start = within(job.get("estimated_start"))
        parts.append(f"starts in ~{start}" if start else "start not known yet")
        if job.get("pending_reason"):
            parts.append(job["pending_reason"])
        return "waiting: " + "; ".join(parts)
    if job["status"] == "running":
        rate, end = job.get("steps_per_second"), within(job.get("estimated_end"))
        n = job.get("workers")
        on = f" on {n} worker{'' if n == 1 else 's'}" if n else ""
        if rate is None or end is None:
            return f"running{on}: no rate yet"
        return f"running{on}: {rate:.3g} steps/s, ends in ~{end}"
    return None


def duration(seconds: float) -> str:
    """'40 s', '12 min', '3.5 h' (what an estimate can honestly tell apart)."""
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cmd_show(args: argparse.Namespace) -> int:
    """One job as JSON."""
    return _api_call(lambda: _client(args).job(args.id))


def cmd_resize(args: argparse.Namespace) -> int:
    """Ask a running elastic job to go on with N workers from its next step boundary."""
    job = api_errors(lambda: _client(args).resize(args.id, args.workers))
    print(
        f"nestor: job {job['id']} will go on with {args.workers} workers from its next step "
        f"(now {job.get('workers') or '?'}); its events say when",
        file=sys.stderr,
    )
    print(json.dumps(job, indent=1))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a job; print it as JSON."""
    return _api_call(lambda: _client(args).cancel(args.id))


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
        return api_errors(run)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    """Download a job's artifacts (default: the final state and files; --step N: that
    checkpoint's model and optimizer state) with a progress bar."""
    from tqdm import tqdm

    client = _client(args)
    listing = api_errors(lambda: client.artifacts(args.id))
    if listing.get("deleted_at"):
        fail(f"job {args.id}'s artifacts were deleted at {listing['deleted_at']}")
    wanted = [
        a
        for a in listing["data"]
        if (a["name"] in args.name if args.name else a["step"] == args.step)
    ]
    if not wanted:
        have = ", ".join(a["name"] for a in listing["data"]) or "none yet"
        fail(f"job {args.id} has no such artifact (it has: {have})")
    out = Path(args.out or f"job-{args.id}")
    out.mkdir(parents=True, exist_ok=True)
    for a in wanted:
        with tqdm(total=a["size"], unit="B", unit_scale=True, desc=a["name"], leave=True) as bar:

            def progress(done: int, total: int, bar=bar) -> None:
                bar.total = total
                bar.update(done - bar.n)

            path = api_errors(lambda a=a, p=progress: client.download(args.id, a["name"], out, p))
        print(f"{path}  sha256 {a['sha256']}", file=sys.stderr)
    return 0


# -------------------------------------------------------------------------------- sweeps
def cmd_sweep(args: argparse.Namespace) -> int:
    """Create a sweep from a JSON file (with ``--code``: one package for every trial)."""
    body = read_json_object(args.file, "sweep")

    def create() -> dict:
        if args.code:  # one package for every trial
            body["base"] = _with_code(args, body.get("base") or {})
        return _client(args).sweep(body)

    return _api_call(create)


def cmd_recipe(args: argparse.Namespace) -> int:
    """The lr per batch size fitted from a stop_at sweep, as a table per optimizer."""
    answer = api_errors(lambda: _client(args).recipe(args.id, args.batch_size))
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


# ------------------------------------------------------------------------ users and tokens
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
            fail("nestor users create NAME")
        made = api_errors(lambda: client.create_user(args.name, _scopes(args.scope)))
        print(f"user {made['id']} {made['name']}; their token (shown once):", file=sys.stderr)
        print(made["token"])
        return 0
    users = api_errors(client.users)
    if args.action == "list":
        for u in users:
            state = "disabled" if u["disabled"] else "active"
            print(f"{u['id']:>4}  {u['name']:<20} {state:<9} {u['created_at']}")
        return 0
    match = [u for u in users if args.name in (u["name"], str(u["id"]))]
    if not match:
        fail(f"no user {args.name!r}")
    done = api_errors(lambda: client.set_user_disabled(match[0]["id"], args.action == "disable"))
    print(f"user {done['name']}: {'disabled' if done['disabled'] else 'enabled'}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Your tokens: create (the secret is printed once), list, revoke."""
    client = _client(args)
    if args.action == "create":
        made = api_errors(
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
            fail("nestor token revoke ID")
        done = api_errors(lambda: client.revoke_token(int(args.id)))
        print(f"token {done['id']} ({done['name']}) revoked")
        return 0
    for t in api_errors(lambda: client.tokens(args.all)):
        state = "revoked" if t["revoked"] else "active"
        print(
            f"{t['id']:>4}  {t['name']:<16} {t['user'] or '-':<12} {','.join(t['scopes']):<22} "
            f"{state:<8} last used {t['last_used_at'] or 'never'}; "
            f"expires {t['expires_at'] or 'never'}"
        )
    return 0

"""`nestor webhooks`: be told when your jobs and sweeps end (add, list, rm, deliveries,
ping), over the REST API."""

from __future__ import annotations

import argparse
import sys

from .api import _client, _command, _scopes
from .errors import api_errors, fail


def register(sub: argparse._SubParsersAction) -> None:
    """Add `nestor webhooks` to the ``nestor`` parser."""
    p = _command(
        sub,
        "webhooks",
        cmd_webhooks,
        "your webhooks: add URL, list, rm ID, deliveries ID, ping ID",
    )
    p.add_argument("action", choices=["add", "list", "rm", "deliveries", "ping"])
    p.add_argument("target", nargs="?", help="the URL to add, or the webhook's id")
    p.add_argument(
        "--events",
        type=_scopes,
        help="comma-separated, e.g. job.failed,sweep.succeeded (default: all)",
    )
    p.add_argument("--slack", action="store_true", help='send Slack messages {"text": ...}')
    p.add_argument("--all", action="store_true", help="every user's webhooks (admins)")
    p.add_argument("--limit", type=int, default=20, help="deliveries to show")


def cmd_webhooks(args: argparse.Namespace) -> int:
    """Add (the secret is printed once), list, remove, show deliveries of, or ping one."""
    client = _client(args)
    if args.action == "list":
        for w in api_errors(lambda: client.webhooks(args.all))["data"]:
            print(f"{w['id']:>4}  {w['format']:<5} {w['owner'] or '-':<12} {w['url']}")
            print(f"      {', '.join(w['events'])}")
        return 0
    if not args.target:
        fail(f"nestor webhooks {args.action} {'URL' if args.action == 'add' else 'ID'}")
    if args.action == "add":
        fmt = "slack" if args.slack else "json"
        made = api_errors(lambda: client.create_webhook(args.target, args.events, fmt))
        print(
            f"webhook {made['id']} ({made['format']}: {', '.join(made['events'])}); "
            "its signing secret (shown once):",
            file=sys.stderr,
        )
        print(made["secret"])
        return 0
    webhook_id = _id(args.target)
    if args.action == "rm":
        done = api_errors(lambda: client.delete_webhook(webhook_id))
        print(f"webhook {done['id']} ({done['url']}) removed")
        return 0
    if args.action == "ping":
        queued = api_errors(lambda: client.ping_webhook(webhook_id))
        print(f"ping queued: delivery {queued['id']} (nestor webhooks deliveries {webhook_id})")
        return 0
    page = api_errors(lambda: client.webhook_deliveries(webhook_id, args.limit))
    for d in page["data"]:
        answer = d["last_error"] or (f"HTTP {d['last_status_code']}" if d["attempts"] else "")
        when = f"next {d['next_attempt_at']}" if d["status"] == "pending" else ""
        print(
            f"{d['id']:>6}  {d['event']:<18} {d['subject'] or '-':<12} {d['status']:<9} "
            f"{d['attempts']:>2} attempts  {answer} {when}".rstrip()
        )
    print(f"({page['count']} deliveries)")
    return 0


def _id(text: str) -> int:
    if not text.isdigit():
        fail(f"{text!r} is not a webhook id (nestor webhooks list)")
    return int(text)

"""Who may do what: every API route x every kind of caller, generated from the routes
themselves (a route without a declared rule fails here), plus revocation, expiry, disabled
users, ownership, NESTOR_ADMIN_TOKEN rotation and the migration of a previous release's
database."""

from __future__ import annotations

import io
import shutil
import sqlite3
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_token
from service.deps import Scope
from service.models import User, utcnow
from service.settings import Settings

ADMIN = "nst_permissions_admin"
SPEC = {"model": "mnist1d-mlp", "dataset": {"name": "mnist1d", "num_samples": 1000}}
PUBLIC = {"/healthz", "/", "/jobs/{job_id}", "/sweeps/{sweep_id}"}
FIXTURES = Path(__file__).parent / "fixtures"

# Callers: who they are, and the scopes they hold (None: the request must be refused 401).
CALLERS = [
    "no token",
    "expired",
    "revoked",
    "disabled user",
    "read",
    "submit",
    "code",
    "admin",
    "worker of this job",
    "worker of another job",
    "owner",
    "other user",
]


def routes(app) -> list[tuple[str, str, APIRoute]]:
    """(method, path, route) of every API route the app serves (included routers are
    resolved lazily by FastAPI: their effective routes carry the full path)."""
    found = []
    for route in app.router.routes:
        if isinstance(route, APIRoute):
            found += [(m, route.path, route) for m in sorted(route.methods)]
        elif hasattr(route, "effective_route_contexts"):
            for ctx in route.effective_route_contexts():
                if isinstance(ctx.original_route, APIRoute):
                    methods = sorted(ctx.original_route.methods)
                    found += [(m, ctx.path, ctx.original_route) for m in methods]
    return found


def rule(route: APIRoute) -> str | None:
    """The scope a route's ``Scope`` dependency asks for (searched through sub-dependencies)."""
    stack = [route.dependant]
    while stack:
        dep = stack.pop()
        if isinstance(dep.call, Scope):
            return dep.call.scope
        stack += dep.dependencies
    return None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One service (SQLite) with a token per kind of caller, a job and a sweep owned by
    "owner", and a job of another user."""
    home = tmp_path_factory.mktemp("perm")
    app = create_app(Settings(home=home, admin_token=ADMIN), scheduler=False)
    with TestClient(app) as client:
        admin = {"Authorization": f"Bearer {ADMIN}"}

        def user(name, scopes):
            made = client.post("/v1/users", json={"name": name, "scopes": scopes}, headers=admin)
            assert made.status_code == 201, made.text
            return made.json()

        owner = user("owner", ["read", "submit", "code"])
        other = user("other", ["read", "submit", "code"])
        tokens = {
            "admin": ADMIN,
            "owner": owner["token"],
            "other user": other["token"],
            "read": user("reader", ["read"])["token"],
            "submit": user("submitter", ["submit"])["token"],
            "code": user("coder", ["code"])["token"],
        }
        h = {k: {"Authorization": f"Bearer {v}"} for k, v in tokens.items()}
        job = client.post("/v1/jobs", json={"spec": SPEC}, headers=h["owner"]).json()
        their = client.post("/v1/jobs", json={"spec": SPEC}, headers=h["other user"]).json()
        third = client.post("/v1/jobs", json={"spec": SPEC}, headers=h["other user"]).json()
        sweep = client.post(
            "/v1/sweeps",
            json={"name": "s", "base": SPEC, "space": {"seed": [1]}},
            headers=h["owner"],
        ).json()
        with app.state.db.sessions() as db:
            # Workers of jobs the matrix never ends (an ended job's worker tokens are revoked).
            tokens["worker of this job"] = create_token(db, "w", "worker", job_id=their["id"])
            tokens["worker of another job"] = create_token(db, "w", "worker", job_id=third["id"])
            tokens["expired"] = create_token(
                db,
                "old",
                "user",
                user_id=owner["id"],
                scopes=["read", "submit"],
                expires_at=utcnow() - timedelta(seconds=1),
            )
            tokens["revoked"] = create_token(
                db, "gone", "user", user_id=owner["id"], scopes=["read"]
            )
            gone = user("leaver", ["read", "submit"])
            tokens["disabled user"] = gone["token"]
            db.get(User, gone["id"]).disabled = True
            db.commit()
        revoked_id = client.get(
            "/v1/tokens", headers={"Authorization": f"Bearer {tokens['revoked']}"}
        ).json()[-1]["id"]
        assert client.delete(f"/v1/tokens/{revoked_id}", headers=h["owner"]).status_code == 200
        yield client, tokens, {"job": job["id"], "their": their["id"], "sweep": sweep["id"]}


def expected(caller: str, scope: str, owned: bool) -> set[int]:
    """The statuses a caller may get: refused (401/403) or let through (anything else)."""
    if caller in ("no token", "expired", "revoked", "disabled user"):
        return {401}
    if caller.startswith("worker"):
        if scope == "worker":
            return {403} if caller == "worker of another job" else {"ok"}
        return {403}
    if scope == "worker":
        return {"ok"} if caller == "admin" else {403}
    held = {
        "read": {"read"},
        "submit": {"submit"},
        "code": {"code", "submit"},
        "admin": {"read", "submit", "code", "admin", "user"},
        "owner": {"read", "submit", "code"},
        "other user": {"read", "submit", "code"},
    }[caller] | {"user"}
    if scope not in held:
        return {403}
    if owned and caller not in ("owner", "admin"):
        return {403}  # the owner's job or sweep: only its owner or an admin
    return {"ok"}


OWNED = {  # routes that change a resource: only its owner (or an admin) may
    ("POST", "/v1/jobs/{job_id}/cancel"),
    ("POST", "/v1/jobs/{job_id}/retry"),
    ("DELETE", "/v1/jobs/{job_id}/artifacts"),
    ("POST", "/v1/sweeps/{sweep_id}/cancel"),
}


def request_for(method: str, path: str, ids: dict, caller: str) -> dict:
    """A well-formed request for the route, aimed at the owner's job and sweep (ids that do
    not exist for the routes that would otherwise revoke or disable the test's callers)."""
    url = (
        path.replace("{job_id}", str(ids["job"]))
        .replace("{sweep_id}", str(ids["sweep"]))
        .replace("{name}", "model.pt")
        .replace("{package_id}", "sha256:" + "0" * 64)
        .replace("{token_id}", "999999")
        .replace("{user_id}", "999999")
    )
    body: dict = {}
    if (method, path) == ("POST", "/v1/jobs"):
        body = {"json": {"spec": SPEC}}
    elif (method, path) == ("POST", "/v1/sweeps"):
        body = {"json": {"name": "x", "base": SPEC, "space": {"seed": [2]}}}
    elif (method, path) == ("POST", "/v1/users"):
        body = {"json": {"name": f"u{abs(hash(url)) % 10**9}"}}
    elif (method, path) == ("PATCH", "/v1/users/{user_id}"):
        body = {"json": {"disabled": True}}
    elif (method, path) == ("POST", "/v1/tokens"):
        own = {"submit": "submit", "code": "code"}.get(caller, "read")  # a scope it holds
        body = {"json": {"scopes": [own]}}
    elif path.endswith("/ingest"):  # into the job whose worker is "worker of this job"
        url = path.replace("{job_id}", str(ids["their"]))
        body = {"json": {"points": []}}
    elif (method, path) == ("POST", "/v1/packages"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("m.py", "x = 1\n")
        body = {"content": buf.getvalue()}
    return {"method": method, "url": url, **body}


def test_every_api_route_declares_who_may_call_it(world):
    client, _, _ = world
    missing = [
        f"{m} {p}"
        for m, p, r in routes(client.app)
        if p not in PUBLIC and rule(r) is None and r.include_in_schema
    ]
    assert missing == [], "routes without a Scope rule"
    assert len(routes(client.app)) > 25


@pytest.mark.parametrize("caller", CALLERS)
def test_the_permission_matrix(world, caller):
    client, tokens, ids = world
    headers = {"Authorization": f"Bearer {tokens[caller]}"} if caller in tokens else {}
    wrong = []
    for method, path, route in routes(client.app):
        scope = rule(route)
        if scope is None:
            continue
        req = request_for(method, path, ids, caller)
        if "follow" in req["url"] or path.endswith("/events"):
            req["url"] += "?since_step=999999"
        if path.endswith("/events") or path.endswith("/logs"):
            continue  # streams: checked below with a request that ends
        resp = client.request(**req, headers=headers)
        want = expected(caller, scope, (method, path) in OWNED)
        got = "ok" if resp.status_code not in (401, 403) else resp.status_code
        if got not in want:
            wrong.append(f"{method} {path}: {resp.status_code} {resp.text[:120]}")
    assert wrong == []


@pytest.mark.parametrize("caller", ["no token", "revoked", "read", "worker of this job"])
def test_streams_follow_the_same_rules(world, caller):
    client, tokens, ids = world
    headers = {"Authorization": f"Bearer {tokens[caller]}"} if caller in tokens else {}
    want = {"no token": 401, "revoked": 401, "read": 200}.get(caller, 403)
    resp = client.get(f"/v1/jobs/{ids['their']}/logs", headers=headers)  # not following
    assert resp.status_code == want
    owner = {"Authorization": f"Bearer {tokens['owner']}"}
    ended = client.post("/v1/jobs", json={"spec": SPEC}, headers=owner).json()["id"]
    client.post(f"/v1/jobs/{ended}/cancel", headers=owner)
    for path in (f"/v1/jobs/{ended}/events", f"/v1/jobs/{ended}/logs?follow=true"):
        with client.stream("GET", path, headers=headers) as resp:
            body = resp.read().decode()
        assert resp.status_code == want, body
        if want == 200:
            assert "event: end" in body


def test_revocation_and_disabling_act_on_the_very_next_request(world):
    client = world[0]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    made = client.post("/v1/users", json={"name": "brief"}, headers=admin).json()
    mine = {"Authorization": f"Bearer {made['token']}"}
    extra = client.post(
        "/v1/tokens", json={"name": "ci", "scopes": ["read"], "expires_in_days": 30}, headers=mine
    ).json()
    listed = client.get("/v1/tokens", headers=mine).json()
    assert {t["name"] for t in listed} == {"first token", "ci"}
    assert all("token" not in t for t in listed)  # the secret is never shown again
    assert listed[-1]["expires_at"] and listed[-1]["scopes"] == ["read"]
    ci = {"Authorization": f"Bearer {extra['token']}"}
    assert client.get("/v1/jobs", headers=ci).status_code == 200
    assert client.get("/v1/tokens", headers=mine).json()[-1]["last_used_at"] is not None
    resp = client.post("/v1/tokens", json={"scopes": ["admin"]}, headers=mine)
    assert resp.status_code == 403 and "admin" in resp.json()["detail"]
    assert client.delete(f"/v1/tokens/{extra['id']}", headers=mine).status_code == 200
    assert client.get("/v1/jobs", headers=ci).status_code == 401
    assert client.patch(f"/v1/users/{made['id']}", json={"disabled": True}, headers=admin).json()[
        "disabled"
    ]
    assert client.get("/v1/jobs", headers=mine).status_code == 401
    client.patch(f"/v1/users/{made['id']}", json={"disabled": False}, headers=admin)
    assert client.get("/v1/jobs", headers=mine).status_code == 200
    actions = [a["action"] for a in client.get("/v1/audit", headers=admin).json()]
    for action in ("user.create", "token.create", "token.revoke", "user.disable", "user.enable"):
        assert action in actions


def test_ownership_one_user_cannot_cancel_anothers_job(world):
    client, tokens, _ = world
    other = {"Authorization": f"Bearer {tokens['other user']}"}
    owner = {"Authorization": f"Bearer {tokens['owner']}"}
    job = client.post("/v1/jobs", json={"spec": SPEC}, headers=owner).json()
    assert job["owner"] == "owner"
    resp = client.post(f"/v1/jobs/{job['id']}/cancel", headers=other)
    assert resp.status_code == 403 and "belongs to another user" in resp.json()["detail"]
    assert client.get(f"/v1/jobs/{job['id']}", headers=other).json()["status"] == "queued"
    mine = client.get("/v1/jobs", params={"owner": "me"}, headers=owner).json()["data"]
    assert mine and {j["owner"] for j in mine} == {"owner"}
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=owner).status_code == 200


def test_changing_the_configured_admin_token_revokes_the_old_one(tmp_path):
    home = tmp_path / "home"
    first = Settings(home=home, admin_token="nst_first")
    with TestClient(create_app(first, scheduler=False)) as c:
        assert c.get("/v1/jobs", headers={"Authorization": "Bearer nst_first"}).status_code == 200
    with TestClient(
        create_app(Settings(home=home, admin_token="nst_second"), scheduler=False)
    ) as c:
        assert c.get("/v1/jobs", headers={"Authorization": "Bearer nst_first"}).status_code == 401
        assert c.get("/v1/users", headers={"Authorization": "Bearer nst_second"}).status_code == 200


def test_a_previous_release_database_upgrades_with_jobs_and_tokens_intact(tmp_path):
    """nestor-0005.db was made by the release before users existed: 5 jobs (one cancelled,
    two in a sweep), the NESTOR_ADMIN_TOKEN it ran with and a user token."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(FIXTURES / "nestor-0005.db", home / "nestor.db")
    settings = Settings(home=home, admin_token="nst_previous_release_admin")
    with TestClient(create_app(settings, scheduler=False)) as c:
        for secret in ("nst_previous_release_admin", "nst_previous_release_user"):
            h = {"Authorization": f"Bearer {secret}"}
            jobs = c.get("/v1/jobs", headers=h).json()
            assert jobs["count"] == 5 and {j["owner"] for j in jobs["data"]} == {"admin"}
            assert c.get("/v1/me", headers=h).json()["scopes"] == [
                "read",
                "submit",
                "code",
                "admin",
            ]
        assert [j["status"] for j in jobs["data"]][-1] == "cancelled"
        assert c.get("/v1/sweeps", headers=h).json()["data"][0]["owner"] == "admin"
    with sqlite3.connect(home / "nestor.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0] >= "0006"


def test_the_cli_creates_users_and_scoped_expiring_tokens(api_server, capsys):
    from service.cli import main as nestor

    live, _ = api_server
    base = ["--url", live.url]
    assert nestor(["users", "create", "carol", *base, "--token", live.settings.admin_token]) == 0
    carol = capsys.readouterr().out.strip()
    assert carol.startswith("nst_")
    args = ["token", "create", "--scope", "read", "--expires", "30d", "--name", "ci"]
    assert nestor([*args, *base, "--token", carol]) == 0
    ci = capsys.readouterr().out.strip()
    assert nestor(["token", "list", *base, "--token", ci]) == 0
    listed = capsys.readouterr().out
    assert "ci " in listed and "read " in listed and "expires never" in listed  # first token
    token_id = next(line.split()[0] for line in listed.splitlines() if " ci " in line)
    assert nestor(["token", "revoke", token_id, *base, "--token", carol]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        nestor(["jobs", *base, "--token", ci])
    assert "401" in capsys.readouterr().err
    assert nestor(["users", "disable", "carol", *base, "--token", live.settings.admin_token]) == 0
    assert "disabled" in capsys.readouterr().out

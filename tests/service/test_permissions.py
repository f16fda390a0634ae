"""Who may do what: every API route x every kind of caller, generated from the routes
themselves (a route without a declared rule fails here), plus revocation, expiry, disabled
users, ownership, NESTOR_ADMIN_TOKEN rotation and the migration of a previous release's
database."""

from __future__ import annotations

import io
import itertools
import json
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
        their = client.post("/v1/jobs", json={"spec": SPEC}, headers=h["other user"]).json()
        third = client.post("/v1/jobs", json={"spec": SPEC}, headers=h["other user"]).json()
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
        yield (
            client,
            tokens,
            {"their": their["id"], "owner token": owner["token"], "counter": itertools.count()},
        )


def refused(caller: str, scope: str, owned: bool) -> int | None:
    """401 or 403 when the caller may not use a route that needs ``scope``, else None."""
    if caller in ("no token", "expired", "revoked", "disabled user"):
        return 401
    if caller.startswith("worker"):
        return None if scope == "worker" and caller == "worker of this job" else 403
    if scope == "worker":
        return None if caller == "admin" else 403
    held = {
        "read": {"read"},
        "submit": {"submit"},
        "code": {"code", "submit"},
        "admin": {"read", "submit", "code", "admin", "user"},
        "owner": {"read", "submit", "code"},
        "other user": {"read", "submit", "code"},
    }[caller] | {"user"}
    if scope not in held:
        return 403
    if owned and caller not in ("owner", "admin"):
        return 403  # the owner's job or sweep: only its owner or an admin
    return None


OWNED = {  # routes that change a resource: only its owner (or an admin) may
    ("POST", "/v1/jobs/{job_id}/cancel"),
    ("PATCH", "/v1/jobs/{job_id}"),
    ("POST", "/v1/jobs/{job_id}/retry"),
    ("DELETE", "/v1/jobs/{job_id}/artifacts"),
    ("POST", "/v1/sweeps/{sweep_id}/cancel"),
}

# What each route answers a caller it lets through, for the request ``request_for`` makes: a
# queued job and a running sweep of "owner" made for this request alone, ids that do not
# exist where the route would otherwise revoke or disable the test's own callers. A route
# missing here fails the matrix, as one without a Scope rule does.
ALLOWED = {
    ("GET", "/metrics"): 200,
    ("GET", "/v1/audit"): 200,
    ("GET", "/v1/jobs"): 200,
    ("POST", "/v1/jobs"): 201,
    ("GET", "/v1/jobs/{job_id}"): 200,
    ("PATCH", "/v1/jobs/{job_id}"): 422,  # a fixed-size job cannot be resized
    ("GET", "/v1/jobs/{job_id}/artifacts"): 200,
    ("DELETE", "/v1/jobs/{job_id}/artifacts"): 409,  # the job has not ended
    ("GET", "/v1/jobs/{job_id}/artifacts/{name}"): 404,  # nor left a model
    ("POST", "/v1/jobs/{job_id}/cancel"): 200,
    ("GET", "/v1/jobs/{job_id}/events"): 200,
    ("GET", "/v1/jobs/{job_id}/events/history"): 200,
    ("POST", "/v1/jobs/{job_id}/ingest"): 200,
    ("GET", "/v1/jobs/{job_id}/logs"): 200,
    ("GET", "/v1/jobs/{job_id}/metrics"): 200,
    ("POST", "/v1/jobs/{job_id}/retry"): 201,
    ("GET", "/v1/me"): 200,
    ("POST", "/v1/packages"): 201,  # a zip no one uploaded before
    ("GET", "/v1/packages/{package_id}"): 404,
    ("GET", "/v1/sweeps"): 200,
    ("POST", "/v1/sweeps"): 201,
    ("GET", "/v1/sweeps/{sweep_id}"): 200,
    ("POST", "/v1/sweeps/{sweep_id}/cancel"): 200,
    ("GET", "/v1/sweeps/{sweep_id}/recipe"): 409,  # its trials have no stop_at target
    ("GET", "/v1/tokens"): 200,
    ("POST", "/v1/tokens"): 201,
    ("DELETE", "/v1/tokens/{token_id}"): 404,
    ("GET", "/v1/users"): 200,
    ("POST", "/v1/users"): 201,
    ("PATCH", "/v1/users/{user_id}"): 404,
    ("GET", "/v1/webhooks"): 200,
    ("POST", "/v1/webhooks"): 201,
    ("DELETE", "/v1/webhooks/{webhook_id}"): 404,  # another's is a 404 too (test_webhooks)
    ("GET", "/v1/webhooks/{webhook_id}/deliveries"): 404,
    ("POST", "/v1/webhooks/{webhook_id}/ping"): 404,
}


def request_for(client, method: str, path: str, ids: dict, caller: str) -> dict:
    """A well-formed request for the route, aimed at a fresh job and sweep of the owner
    (ids that do not exist for the routes that would otherwise revoke or disable the test's
    callers)."""
    owner = {"Authorization": f"Bearer {ids['owner token']}"}
    job = client.post("/v1/jobs", json={"spec": SPEC}, headers=owner).json()["id"]
    sweep = client.post(
        "/v1/sweeps", json={"name": "s", "base": SPEC, "space": {"seed": [1]}}, headers=owner
    ).json()["id"]
    unique = next(ids["counter"])
    url = (
        path.replace("{job_id}", str(job))
        .replace("{sweep_id}", str(sweep))
        .replace("{name}", "model.pt")
        .replace("{package_id}", "sha256:" + "0" * 64)
        .replace("{token_id}", "999999")
        .replace("{user_id}", "999999")
        .replace("{webhook_id}", "999999")
    )
    body: dict = {}
    if (method, path) == ("POST", "/v1/jobs"):
        body = {"json": {"spec": SPEC}}
    elif (method, path) == ("POST", "/v1/sweeps"):
        body = {"json": {"name": "x", "base": SPEC, "space": {"seed": [2]}}}
    elif (method, path) == ("POST", "/v1/users"):
        body = {"json": {"name": f"user{unique}"}}
    elif (method, path) == ("POST", "/v1/webhooks"):
        body = {"json": {"url": "https://hooks.example.com/nestor"}}
    elif (method, path) == ("PATCH", "/v1/jobs/{job_id}"):
        body = {"json": {"num_workers": 2}}
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
            z.writestr("m.py", f"x = {unique}\n")
        body = {"content": buf.getvalue()}
    if path.endswith("/events") or path.endswith("/logs"):
        client.post(f"/v1/jobs/{job}/cancel", headers=owner)  # an ended job's stream ends
        url += "?follow=true" if path.endswith("/logs") else ""
    return {"method": method, "url": url, **body}


def test_every_api_route_declares_who_may_call_it(world):
    client, _, _ = world
    served = [(m, p, r) for m, p, r in routes(client.app) if r.include_in_schema]
    missing = [f"{m} {p}" for m, p, r in served if p not in PUBLIC and rule(r) is None]
    assert missing == [], "routes without a Scope rule"
    unknown = [f"{m} {p}" for m, p, r in served if p not in PUBLIC and (m, p) not in ALLOWED]
    assert unknown == [], "routes without an expected status in ALLOWED"
    assert len(served) > 25


@pytest.mark.parametrize("caller", CALLERS)
def test_the_permission_matrix(world, caller):
    """Every scoped route, this caller: exactly 401, 403 or the status the route gives a
    caller it lets through (streams included, on an ended job so that they end)."""
    client, tokens, ids = world
    headers = {"Authorization": f"Bearer {tokens[caller]}"} if caller in tokens else {}
    wrong = []
    for method, path, route in routes(client.app):
        scope = rule(route)
        if scope is None:
            continue
        req = request_for(client, method, path, ids, caller)
        want = refused(caller, scope, (method, path) in OWNED) or ALLOWED[(method, path)]
        with client.stream(**req, headers=headers) as resp:
            body = resp.read().decode()
        if resp.status_code != want:
            wrong.append(f"{method} {path}: {resp.status_code} (want {want}) {body[:120]}")
        elif want == 200 and path.endswith(("/events", "/logs")):
            assert "event: end" in body, (path, body[-200:])
    assert wrong == []


def audit_since(client, since_id: int) -> list[dict]:
    """Every audit row after ``since_id``, page by page."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    rows: list[dict] = []
    while page := client.get(
        "/v1/audit", params={"since_id": since_id, "limit": 1000}, headers=admin
    ).json():
        rows += page
        since_id = page[-1]["id"]
    return rows


def test_revocation_and_disabling_act_on_the_very_next_request(world):
    client = world[0]
    start = audit_since(client, 0)[-1]["id"]
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
    actions = [a["action"] for a in audit_since(client, start)]
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
        second = {"Authorization": "Bearer nst_second"}
        assert c.get("/v1/jobs", headers={"Authorization": "Bearer nst_first"}).status_code == 401
        assert c.get("/v1/users", headers=second).status_code == 200
        rows = [
            (r["user"], r["action"], r["detail"]) for r in c.get("/v1/audit", headers=second).json()
        ]
        assert rows[-2:] == [
            (None, "token.revoke", "NESTOR_ADMIN_TOKEN changed"),
            (None, "token.create", "at start"),
        ], rows


def test_a_previous_release_database_upgrades_with_jobs_and_tokens_intact(tmp_path):
    """nestor-0005.db was made by the release before users existed (how:
    fixtures/make_nestor_0005.py): 5 jobs (one cancelled, one running with 10 metric points,
    two in a sweep), the NESTOR_ADMIN_TOKEN it ran with, a user token and a worker token."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(FIXTURES / "nestor-0005.db", home / "nestor.db")
    with sqlite3.connect(home / "nestor.db") as db:
        before = db.execute("SELECT id, name, status, spec FROM jobs ORDER BY id").fetchall()
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
        after = [(j["id"], j["name"], j["status"], j["spec"]) for j in reversed(jobs["data"])]
        assert after == [(i, n, st, json.loads(spec)) for i, n, st, spec in before]
        assert [st for _, _, st, _ in after] == [
            "cancelled",
            "running",
            "queued",
            "queued",
            "queued",
        ]
        assert c.get("/v1/sweeps", headers=h).json()["data"][0]["owner"] == "admin"
        loss = c.get("/v1/jobs/2/metrics", params={"keys": "loss"}, headers=h).json()
        assert loss["series"]["loss"]["step"] == list(range(1, 11))
        assert loss["series"]["loss"]["value"] == [2.0 / s for s in range(1, 11)]
        # The running job's worker token still writes into its own job, and only there.
        worker = {"Authorization": "Bearer nst_previous_release_worker"}
        point = {"points": [{"step": 11, "values": {"loss": 0.1}}]}
        assert c.post("/v1/jobs/2/ingest", json=point, headers=worker).status_code == 200
        assert c.post("/v1/jobs/3/ingest", json=point, headers=worker).status_code == 403
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


def test_only_code_tokens_run_their_own_code(world):
    """``submit`` runs built-in models and data only: every way a spec names code to import
    (a package, a factory, a loss, requirements) or files to read needs ``code``, in a job,
    a retry and in any trial of a sweep."""
    client, tokens, _ = world
    submit = {"Authorization": f"Bearer {tokens['submit']}"}
    code = {"Authorization": f"Bearer {tokens['code']}"}
    own = {
        "model.factory": {"model": {"factory": "os:system", "kwargs": {"command": "true"}}},
        "dataset.factory": {"dataset": {"factory": "os:getcwd"}},
        "dataset.path": {"dataset": {"path": "/etc"}, "max_steps": 2},
        "loss": {"loss": "os:system"},
        "requirements": {"requirements": ["anything"]},
        "code": {"code": "sha256:" + "1" * 64},
    }
    for field, extra in own.items():
        spec = {**SPEC, **extra}
        resp = client.post("/v1/jobs", json={"spec": spec}, headers=submit)
        assert resp.status_code == 403, (field, resp.text)
        assert "'code' scope" in resp.json()["detail"] and field in resp.json()["detail"]
        # A code token gets past the scope (to 201, or 422 for the package nobody stored).
        allowed = client.post("/v1/jobs", json={"spec": spec}, headers=code)
        assert allowed.status_code in (201, 422) and "scope" not in allowed.text, allowed.text
    varied = {"name": "v", "base": SPEC, "space": {"loss": [None, "os:system"]}}
    resp = client.post("/v1/sweeps", json=varied, headers=submit)
    assert resp.status_code == 403 and "trial loss=os:system" in resp.json()["detail"]
    pointed = {"name": "p", "base": SPEC, "points": [{"model": "mnist1d-mlp"},
               {"model": {"factory": "os:system"}}]}  # fmt: skip
    assert client.post("/v1/sweeps", json=pointed, headers=submit).status_code == 403
    reader = {"Authorization": f"Bearer {tokens['read']}"}
    names = [s["name"] for s in client.get("/v1/sweeps", headers=reader).json()["data"]]
    assert "v" not in names and "p" not in names  # nothing stored
    # A retry runs the stored spec again: the same rule.
    mine = client.post("/v1/jobs", json={"spec": {**SPEC, "loss": "os:system"}}, headers=code)
    assert client.post(f"/v1/jobs/{mine.json()['id']}/retry", headers=code).status_code == 201


def test_a_worker_token_ends_with_its_job_and_writes_only_into_it(world):
    client, tokens, _ = world
    owner = {"Authorization": f"Bearer {tokens['owner']}"}
    job = client.post("/v1/jobs", json={"spec": SPEC}, headers=owner).json()["id"]
    other = client.post("/v1/jobs", json={"spec": SPEC}, headers=owner).json()["id"]
    with client.app.state.db.sessions() as db:
        worker = {"Authorization": f"Bearer {create_token(db, 'w', 'worker', job_id=job)}"}
    point = {"points": [{"step": 1, "values": {"loss": 1.0}}]}
    assert client.post(f"/v1/jobs/{job}/ingest", json=point, headers=worker).status_code == 200
    assert client.post(f"/v1/jobs/{other}/ingest", json=point, headers=worker).status_code == 403
    assert client.post(f"/v1/jobs/{job}/cancel", headers=owner).status_code == 200
    resp = client.post(f"/v1/jobs/{job}/ingest", json=point, headers=worker)
    assert resp.status_code == 401, resp.text


def test_a_user_cannot_see_or_revoke_anothers_tokens(world):
    client, tokens, _ = world
    owner = {"Authorization": f"Bearer {tokens['owner']}"}
    other = {"Authorization": f"Bearer {tokens['other user']}"}
    made = client.post("/v1/tokens", json={"name": "mine", "scopes": ["read"]}, headers=owner)
    theirs = made.json()["id"]
    assert theirs not in [t["id"] for t in client.get("/v1/tokens", headers=other).json()]
    assert client.delete(f"/v1/tokens/{theirs}", headers=other).status_code == 404
    mine = {"Authorization": f"Bearer {made.json()['token']}"}
    assert client.get("/v1/me", headers=mine).status_code == 200  # still alive


def test_the_audit_log_names_who_submitted_cancelled_retried_and_uploaded(world):
    client, tokens, _ = world
    start = audit_since(client, 0)[-1]["id"]
    owner = {"Authorization": f"Bearer {tokens['owner']}"}
    job = client.post("/v1/jobs", json={"spec": SPEC}, headers=owner).json()["id"]
    client.post(f"/v1/jobs/{job}/cancel", headers=owner)
    retried = client.post(f"/v1/jobs/{job}/retry", headers=owner).json()["id"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("audited.py", "x = 1\n")
    package = client.post("/v1/packages", content=buf.getvalue(), headers=owner).json()
    assert package["owner"] == "owner"
    assert client.get(f"/v1/packages/{package['id']}", headers=owner).json()["owner"] == "owner"
    rows = [(r["user"], r["action"], r["target"]) for r in audit_since(client, start)]
    assert rows == [
        ("owner", "job.submit", f"job {job}"),
        ("owner", "job.cancel", f"job {job}"),
        ("owner", "job.retry", f"job {job}"),
        ("owner", "package.upload", package["id"][:100]),
    ], rows
    assert retried > job

"""A Python client for the Nestor API.

>>> from service.client import Client
>>> c = Client("http://127.0.0.1:8000", token=open("~/.nestor/admin_token").read())
>>> job = c.submit(spec, name="adan-32k")
>>> c.wait(job["id"])["status"]
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from .package_pack import pack_dir, package_id


class NestorError(RuntimeError):
    """An API error: the HTTP status and the service's ``detail``."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


def default_token() -> str | None:
    """NESTOR_TOKEN, else the embedded service's admin token file in NESTOR_HOME."""
    if os.environ.get("NESTOR_TOKEN"):
        return os.environ["NESTOR_TOKEN"]
    from .settings import Settings  # the one reader of NESTOR_HOME

    path = Settings().home_dir / "admin_token"
    return path.read_text().strip() if path.exists() else None


class Client:
    def __init__(
        self, url: str | None = None, token: str | None = None, timeout: float = 30.0
    ) -> None:
        self.url = (url or os.environ.get("NESTOR_URL", "http://127.0.0.1:8000")).rstrip("/")
        token = token or default_token()
        headers = {"Authorization": f"Bearer {token.strip()}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        resp = self._http.request(method, path, **kw)
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail")
            except ValueError:
                detail = resp.text
            raise NestorError(resp.status_code, detail)
        return resp.json()

    def submit(self, spec: dict[str, Any], name: str = "job", priority: int = 0) -> dict:
        return self._call(
            "POST", "/v1/jobs", json={"name": name, "spec": spec, "priority": priority}
        )

    def jobs(self, status: str | None = None, sweep: int | None = None, limit: int = 100) -> dict:
        params = {
            k: v
            for k, v in {"status": status, "sweep": sweep, "limit": limit}.items()
            if v is not None
        }
        return self._call("GET", "/v1/jobs", params=params)

    def job(self, job_id: int) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: int) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def resize(self, job_id: int, num_workers: int) -> dict:
        """Ask a running elastic job to go on with ``num_workers`` workers."""
        return self._call("PATCH", f"/v1/jobs/{job_id}", json={"num_workers": num_workers})

    def retry(self, job_id: int) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}/retry")

    def metrics(self, job_id: int, keys: list[str] | None = None, max_points: int = 2000) -> dict:
        params: dict[str, Any] = {"max_points": max_points}
        if keys:
            params["keys"] = ",".join(keys)
        return self._call("GET", f"/v1/jobs/{job_id}/metrics", params=params)

    def events(self, job_id: int) -> list[dict]:
        return self._call("GET", f"/v1/jobs/{job_id}/events/history")

    def sweep(self, body: dict[str, Any]) -> dict:
        """Create a sweep: {"name", "base": TrainSpec, "space", "search", ...}."""
        return self._call("POST", "/v1/sweeps", json=body)

    def sweeps(self) -> dict:
        return self._call("GET", "/v1/sweeps")

    def sweep_detail(self, sweep_id: int, sort: str | None = None, order: str = "asc") -> dict:
        params = {"order": order, **({"sort": sort} if sort else {})}
        return self._call("GET", f"/v1/sweeps/{sweep_id}", params=params)

    def recipe(self, sweep_id: int, batch_size: int | None = None) -> dict:
        """The lr per batch size fitted from a sweep with a stop_at target."""
        params = {"batch_size": batch_size} if batch_size else None
        return self._call("GET", f"/v1/sweeps/{sweep_id}/recipe", params=params)

    def cancel_sweep(self, sweep_id: int) -> dict:
        return self._call("POST", f"/v1/sweeps/{sweep_id}/cancel")

    def upload_package(self, data: bytes) -> dict:
        """Upload a zip (`service.package_pack.pack_dir`); returns {id, size, files, created_at}.
        The same bytes are stored once."""
        return self._call(
            "POST", "/v1/packages", content=data, headers={"Content-Type": "application/zip"}
        )

    def package(self, pkg_id: str) -> dict:
        return self._call("GET", f"/v1/packages/{pkg_id}")

    def ensure_package(self, directory: str | Path) -> str:
        """Pack ``directory`` (skipping .git, .venv, __pycache__ and what .gitignore
        ignores) and upload it unless the service already has these bytes; returns the
        package id for a spec's ``code``."""
        data = pack_dir(Path(directory))
        pkg_id = package_id(data)
        try:
            self.package(pkg_id)
        except NestorError as e:
            if e.status != 404:
                raise
            stored = self.upload_package(data)["id"]
            if stored != pkg_id:
                raise RuntimeError(f"uploaded {pkg_id} but the service stored {stored}") from None
        return pkg_id

    # ------------------------------------------------------------------ users and tokens
    def me(self) -> dict:
        """Who this client's token stands for: {"user", "scopes", ...}."""
        return self._call("GET", "/v1/me")

    def create_user(self, name: str, scopes: list[str] | None = None) -> dict:
        """(Admins.) A new user; the answer's ``token`` is their first token, shown once."""
        body: dict[str, Any] = {"name": name}
        if scopes:
            body["scopes"] = scopes
        return self._call("POST", "/v1/users", json=body)

    def users(self) -> list[dict]:
        return self._call("GET", "/v1/users")

    def set_user_disabled(self, user_id: int, disabled: bool = True) -> dict:
        return self._call("PATCH", f"/v1/users/{user_id}", json={"disabled": disabled})

    def create_token(
        self, name: str, scopes: list[str], expires_in_days: float | None = None
    ) -> dict:
        """A new token of this client's user; the answer's ``token`` is shown once."""
        body = {"name": name, "scopes": scopes, "expires_in_days": expires_in_days}
        return self._call("POST", "/v1/tokens", json=body)

    def tokens(self, all_users: bool = False) -> list[dict]:
        return self._call("GET", "/v1/tokens", params={"all": str(all_users).lower()})

    def revoke_token(self, token_id: int) -> dict:
        return self._call("DELETE", f"/v1/tokens/{token_id}")

    def audit(self, since_id: int = 0, limit: int = 100) -> list[dict]:
        return self._call("GET", "/v1/audit", params={"since_id": since_id, "limit": limit})

    # ------------------------------------------------------------------ webhooks
    def create_webhook(
        self, url: str, events: list[str] | None = None, format: str = "json"
    ) -> dict:
        """Be told of your jobs' and sweeps' ``events`` (default: all) at ``url``; the
        answer's ``secret`` (shown once) verifies each delivery's Nestor-Signature."""
        body: dict[str, Any] = {"url": url, "format": format}
        if events:
            body["events"] = events
        return self._call("POST", "/v1/webhooks", json=body)

    def webhooks(self, all_users: bool = False) -> dict:
        """Your webhooks: {"data": [...], "count"} (``all_users``: everyone's, admins)."""
        return self._call("GET", "/v1/webhooks", params={"all": str(all_users).lower()})

    def delete_webhook(self, webhook_id: int) -> dict:
        return self._call("DELETE", f"/v1/webhooks/{webhook_id}")

    def webhook_deliveries(self, webhook_id: int, limit: int = 100) -> dict:
        """A webhook's deliveries, newest first: status, attempts, last answer or error."""
        return self._call("GET", f"/v1/webhooks/{webhook_id}/deliveries", params={"limit": limit})

    def ping_webhook(self, webhook_id: int) -> dict:
        """Queue a "ping" delivery; returns it."""
        return self._call("POST", f"/v1/webhooks/{webhook_id}/ping")

    # ------------------------------------------------------------------ outputs
    def logs(self, job_id: int, since: int = 0, limit: int = 1000) -> dict:
        """One page of the job's log: {"lines", "first", "next", "dropped", "notice",
        "running"}; pass ``next`` as ``since`` for the next page."""
        return self._call("GET", f"/v1/jobs/{job_id}/logs", params={"since": since, "limit": limit})

    def follow_logs(self, job_id: int, since: int = 0) -> Iterator[dict]:
        """The job's log pages as they are written, until the job has ended (a server-sent
        event stream; reconnects where it stopped if the connection drops)."""
        while True:
            try:
                with self._http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/logs",
                    params={"follow": "true", "since": since},
                    headers={"Accept": "text/event-stream", "Last-Event-ID": str(since)},
                    timeout=httpx.Timeout(self._http.timeout.connect, read=120.0),
                ) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        raise NestorError(resp.status_code, resp.json().get("detail"))
                    event = None
                    for line in resp.iter_lines():
                        if line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:"):
                            data = json.loads(line[5:])
                            if event == "end":
                                return
                            since = data["next"]
                            yield data
                return
            except (httpx.RemoteProtocolError, httpx.ReadTimeout, httpx.ConnectError):
                time.sleep(1.0)  # the service restarted or the connection dropped

    def artifacts(self, job_id: int) -> dict:
        """The job's artifacts: {"data": [{"name", "size", "sha256", "step", "url"}], ...}."""
        return self._call("GET", f"/v1/jobs/{job_id}/artifacts")

    def download(
        self,
        job_id: int,
        name: str,
        out: str | os.PathLike[str],
        progress: Callable[[int, int], None] | None = None,
    ) -> Path:
        """Download one artifact to ``out`` (a directory or a file path), resuming a partial
        ``.part`` file with a Range request; the SHA-256 is checked. ``progress(done, total)``
        is called as bytes arrive. Returns the file's path."""
        dest = Path(out)
        if dest.is_dir():
            dest = dest / name
        part = dest.with_name(dest.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with self._http.stream(
            "GET", f"/v1/jobs/{job_id}/artifacts/{name}", headers=headers
        ) as resp:
            if resp.status_code >= 400 and resp.status_code != 416:
                resp.read()
                try:
                    detail = resp.json().get("detail")
                except ValueError:
                    detail = resp.text
                raise NestorError(resp.status_code, detail)
            if resp.status_code != 206:  # the whole file (a fresh start, or no range support)
                have = 0
            total = have + int(resp.headers.get("content-length", 0))
            expected = resp.headers.get("x-checksum-sha256")
            h = hashlib.sha256()
            if have:  # the bytes already here count towards the digest
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
            with open(part, "ab" if have else "wb") as f:
                for chunk in resp.iter_bytes(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    have += len(chunk)
                    if progress:
                        progress(have, total)
        if expected and h.hexdigest() != expected:
            part.unlink()
            raise RuntimeError(f"{name}: checksum mismatch (got {h.hexdigest()})")
        os.replace(part, dest)
        return dest

    def delete_artifacts(self, job_id: int) -> dict:
        """Free a finished job's stored model, optimizer state and checkpoints."""
        return self._call("DELETE", f"/v1/jobs/{job_id}/artifacts")

    def wait(self, job_id: int, timeout: float = 3600, poll: float = 1.0) -> dict:
        """Poll until the job ends; returns the job."""
        deadline = time.time() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] not in ("queued", "running"):
                return job
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll)

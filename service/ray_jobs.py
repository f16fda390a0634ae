"""Nestor's few calls to Ray's Jobs API, with Ray's answers read by their HTTP status codes.

Status and stop go to the documented REST endpoints (``GET /api/jobs/{id}``,
``POST /api/jobs/{id}/stop``), so "no such job" is a 404, not a sentence to match.
Submission goes through Ray's SDK, which also packages runtime environments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx


class RayUnavailable(RuntimeError):
    """Ray's Jobs API did not answer; the message names the address."""


@dataclass(frozen=True)
class RayJob:
    status: str  # PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED
    message: str | None
    driver_exit_code: int | None = None  # once the driver has exited (-N: signal N)


class RayJobs:
    def __init__(
        self, dashboard_url: str, timeout: float = 10.0, headers: dict[str, str] | None = None
    ) -> None:
        self.url = dashboard_url.rstrip("/")
        self.headers = dict(headers or {})  # Ray's token, when the cluster has one
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=self.headers)
        self._sdk = None

    def _request(self, method: str, path: str) -> httpx.Response:
        try:
            return self._http.request(method, path)
        except httpx.HTTPError as e:
            raise RayUnavailable(f"Ray's Jobs API at {self.url} did not answer: {e}") from e

    def get(self, submission_id: str) -> RayJob | None:
        """The job's status, or None when Ray has no such job (HTTP 404)."""
        r = self._request("GET", f"/api/jobs/{submission_id}")
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise RayUnavailable(f"Ray's Jobs API at {self.url} answered {r.status_code}")
        body = r.json()
        return RayJob(body["status"], body.get("message"), body.get("driver_exit_code"))

    def stop(self, submission_id: str) -> None:
        """Ask Ray to stop the job's driver and workers (a job that has ended: nothing)."""
        r = self._request("POST", f"/api/jobs/{submission_id}/stop")
        if r.status_code not in (200, 404):
            raise RayUnavailable(f"stopping {submission_id}: Ray answered {r.status_code}")

    def submit(self, submission_id: str, entrypoint: str, runtime_env: dict[str, Any]) -> bool:
        """Submit unless Ray already has this submission (a launch that reached Ray before a
        crash is adopted, not repeated). True if it was submitted now. ``runtime_env``
        (env_vars, a code package's zip as working_dir, pip) is uploaded and set up by Ray
        on every node the job runs on."""
        if self.get(submission_id) is not None:
            return False
        if self._sdk is None:
            from ray.job_submission import JobSubmissionClient

            self._sdk = JobSubmissionClient(self.url, headers=self.headers)
        self._sdk.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env=runtime_env,
        )
        return True

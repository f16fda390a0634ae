"""Property-based requests generated from the OpenAPI document: the API never answers 5xx."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings

from service.app import create_app
from service.auth import create_token
from service.db import Database, upgrade
from service.jobs import create_job
from service.settings import Settings

_home = Path(tempfile.mkdtemp(prefix="nestor-schemathesis-"))
_settings = Settings(home=_home, database_url=f"sqlite:///{_home / 'nestor.db'}")
upgrade(_settings.db_url)
with Database(_settings.db_url).sessions() as _db:
    _TOKEN = create_token(_db, "schemathesis", "admin")
    create_job(_db, "existing", {"model": "mnist1d-mlp"}, 0)  # so ids 1.. exist

app = create_app(_settings, scheduler=False)
# The live event stream of a queued job never ends: checked elsewhere, not fuzzed.
schema = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(
    path="/v1/jobs/{job_id}/events"
)


@schema.parametrize()
# Derandomized: the same cases on every run, so CI is reproducible (it found 5xx on ids
# beyond 64 bits once; tests/service/test_api.py keeps those cases).
@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call(headers={"Authorization": f"Bearer {_TOKEN}"})
    assert response.status_code < 500, (case.method, case.path, response.text[:500])

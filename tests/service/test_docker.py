"""docker/ cannot run here (no Docker engine): check statically that it matches the code."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_copies_what_exists_and_runs_the_cli():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (\S+)", text, flags=re.M):
        assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert '".[postgres]"' in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "postgres = [" in pyproject and 'nestor = "service.cli:main"' in pyproject


def test_compose_wires_postgres_ray_and_the_service(monkeypatch):
    """The compose file read as the code reads it: the service's command goes through the
    CLI's own parser into the settings class, and those settings name the compose file's
    PostgreSQL and Ray head; every NESTOR_ variable is a setting; data and Ray's token are
    shared by every Nestor container, and
    Ray's nodes, where jobs run, mount the run directories alone: not the service's home."""
    from sqlalchemy.engine import make_url

    from service.cli import build_parser
    from service.cli.process import _serve_settings
    from service.settings import Settings

    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "ray-head", "ray-worker", "nestor"}
    nestor = services["nestor"]

    argv = shlex.split(nestor["command"])
    assert argv[:2] == ["nestor", "serve"]
    args = build_parser().parse_args(argv[1:])  # an unknown flag exits here
    for key in list(os.environ):
        if key.startswith("NESTOR_"):
            monkeypatch.delenv(key)
    for key, value in nestor["environment"].items():
        monkeypatch.setenv(key, str(value))
    settings = _serve_settings(args)

    db = make_url(settings.db_url)
    pg = services["postgres"]["environment"]
    assert db.drivername == "postgresql+psycopg" and db.host == "postgres"
    assert (db.username, db.password, db.database) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )
    host, _, port = settings.ray_address.partition(":")
    head = shlex.split(services["ray-head"]["command"])
    assert host == "ray-head" and f"--port={port}" in head and "--head" in head
    assert f"--address={settings.ray_address}" in shlex.split(services["ray-worker"]["command"])

    assert (settings.host, settings.port) == ("0.0.0.0", 8000)  # inside its container
    assert nestor["ports"] == [f"127.0.0.1:{settings.port}:{settings.port}"]  # loopback outside
    assert settings.public_url == "http://nestor:8000"  # what workers call back

    for name, service in services.items():
        for key in service.get("environment") or {}:
            if key.startswith("NESTOR_"):
                field = key.removeprefix("NESTOR_").lower()
                assert field in Settings.model_fields, f"{name}: {key} is no setting"
    home = [v for v in nestor["volumes"] if v.split(":")[1] == str(settings.home_dir)]
    runs = [v for v in nestor["volumes"] if v.split(":")[1] == str(settings.run_root)]
    assert len(home) == 1 and len(runs) == 1 and home != runs
    for name in ("ray-head", "ray-worker", "nestor"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN"] == services["ray-head"]["environment"]["RAY_AUTH_TOKEN"]
    for name in ("ray-head", "ray-worker"):
        # Where jobs run: the run directories, never the service's home, its admin token or
        # the database's credentials.
        ray = services[name]
        assert ray["volumes"] == runs, name
        assert not any(key.startswith("NESTOR_") for key in ray["environment"]), name
        assert "postgres" not in yaml.safe_dump(ray), name  # no database URL, no password

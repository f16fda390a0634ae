"""docker/ cannot run here (no Docker engine): check statically that it matches the code."""

from __future__ import annotations

import re
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


def test_compose_wires_postgres_ray_and_the_service():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "ray-head", "ray-worker", "nestor"}
    serve = services["nestor"]["command"]
    assert "nestor serve" in serve and "postgresql+psycopg://" in serve
    assert "--ray-address ray-head:6379" in serve
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]
    # Every flag the compose file passes to `nestor serve` exists in the CLI.
    from service.cli import build_parser

    serve_parser = build_parser()._subparsers._group_actions[0].choices["serve"]
    known = {opt for a in serve_parser._actions for opt in a.option_strings}
    for flag in re.findall(r"(--[a-z-]+)", serve):
        assert flag in known, flag
    assert services["nestor"]["ports"] == ["127.0.0.1:8000:8000"]  # loopback by default

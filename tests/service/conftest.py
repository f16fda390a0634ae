"""Service fixtures: the app on SQLite or PostgreSQL (a real server the test setup starts)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.client import Client
from service.settings import Settings

from ..helpers import free_port
from ..postgres import PostgresMissing, postgres_server
from .live import LiveService

ADMIN = "nst_test_admin_token"


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server from the Debian package, on a loopback port. Missing
    server: skipped locally, a failure under CI=true."""
    try:
        with postgres_server() as url:
            yield url
    except PostgresMissing as e:
        if os.environ.get("CI") == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nestor.db'}"
    url = request.getfixturevalue("postgres_url")
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:  # a clean schema per test
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return url


@pytest.fixture
def client(db_url, tmp_path):
    settings = Settings(home=tmp_path / "home", database_url=db_url, admin_token=ADMIN)
    with TestClient(create_app(settings, scheduler=False)) as c:
        c.headers["Authorization"] = f"Bearer {ADMIN}"
        yield c


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    """The whole service on the session's real Ray cluster, served by uvicorn on loopback;
    yields (LiveService, Client with the admin token)."""
    port = free_port()
    home = tmp_path_factory.mktemp("svc")
    settings = Settings(home=home, admin_token=ADMIN, port=port, scheduler_interval=0.5)
    live = LiveService(settings, ray_cluster)
    live.start()
    yield live, Client(f"http://127.0.0.1:{port}", ADMIN)
    live.stop()


@pytest.fixture(scope="module")
def api_server(tmp_path_factory):
    """The API alone (no scheduler, no Ray) served by uvicorn on loopback, on SQLite, with
    short stream intervals; yields (LiveService, Client with the admin token)."""
    port = free_port()
    home = tmp_path_factory.mktemp("api")
    settings = Settings(
        home=home,
        admin_token=ADMIN,
        port=port,
        stream_poll_seconds=0.1,
        sse_ping_seconds=0.5,
    )
    live = LiveService(settings)
    live.start()
    yield live, Client(f"http://127.0.0.1:{port}", ADMIN)
    live.stop()


CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("NESTOR_TEST_ARTIFACTS", Path(__file__).parents[2] / "artifacts"))


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright, headless. Missing browser: skipped locally,
    a failure under CI=true."""
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium (Debian package chromium) is not installed")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-background-networking"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, request):
    """A fresh browser context per test at a laptop size; a screenshot is saved under
    artifacts/screenshots/ when the test ends, pass or fail."""
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    shots = ARTIFACTS / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / f"{request.node.name}.png"), full_page=True)
    context.close()

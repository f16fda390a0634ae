"""Service fixtures: the app on SQLite or PostgreSQL (a real server the test setup starts)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.client import Client
from service.settings import Settings

from .live import LiveService

ADMIN = "nst_test_admin_token"


def _pg_bin() -> Path | None:
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / "initdb").exists():
            return root
    return None


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server from the Debian package, on a loopback port. Missing
    server: skipped locally, a failure under CI=true."""
    bin_dir = _pg_bin()
    if bin_dir is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL (Debian package postgresql) is not installed")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    # PostgreSQL refuses to run as root: as root, run it as the package's postgres user in a
    # directory that user can reach (pytest's own tmp dirs are private to root).
    data = Path(tempfile.mkdtemp(prefix="nestor-pg-"))
    user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if user:
        shutil.chown(data, "postgres")
    subprocess.run(
        [*user, str(bin_dir / "initdb"), "-D", str(data), "-U", "nestor", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            *user,
            str(bin_dir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "-k",
            str(data),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        ok = (
            subprocess.run(
                [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                capture_output=True,
            ).returncode
            == 0
        )
        if ok:
            break
        time.sleep(0.2)
    subprocess.run(
        [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "nestor", "nestor"],
        check=True,
        capture_output=True,
    )
    yield f"postgresql+psycopg://nestor@127.0.0.1:{port}/nestor"
    proc.terminate()
    proc.wait(timeout=30)
    shutil.rmtree(data, ignore_errors=True)


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path_factory.mktemp("svc")
    settings = Settings(home=home, admin_token=ADMIN, port=port, scheduler_interval=0.5)
    live = LiveService(settings, ray_cluster)
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

"""The web dashboard: static pages that read the public JSON API with the user's token.

The pages hold no data and need no token to load; every number on them comes from /v1/...
with the token the user typed into the sign-in form (kept in the tab's sessionStorage, sent
as a bearer header, never in a URL). Charts are drawn by plotly.js, served from the `plotly`
package installed by pip (and the job page's smaller basic bundle, fetched at install:
service/vendor.py), so no third-party code lives in this repository.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import plotly
from fastapi import APIRouter, FastAPI
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from .vendor import PLOTLY_BASIC

STATIC = Path(__file__).parent / "static"
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
CACHE = {"Cache-Control": "public, max-age=86400"}

router = APIRouter(include_in_schema=False)
Id = Annotated[int, PathParam(ge=1, le=2**31 - 1)]


SHELL = (STATIC / "page.html").read_text()
PRELOAD = '  <link rel="preload" href="/vendor/{bundle}" as="script" id="plotly">\n'


def _page(title: str, script: str, charts: str | None) -> HTMLResponse:
    """One HTML shell for every page: a title, the page's module, and the plotly.js bundle
    it draws with (``charts``: "basic" or "full"), preloaded."""
    html = SHELL.replace("{title}", title).replace("{script}", script)
    if charts == "basic" and PLOTLY_BASIC.exists():
        bundle = "plotly-basic.min.js"
    else:
        bundle = "plotly.min.js"
    html = html.replace("{preload}", PRELOAD.format(bundle=bundle) if charts else "")
    return HTMLResponse(html, headers={"Cache-Control": "no-cache"})


@router.get("/")
def home() -> HTMLResponse:
    return _page("runs", "home.js", charts=None)


@router.get("/jobs/{job_id}")
def job_page(job_id: Id) -> HTMLResponse:
    return _page("job", "job.js", charts="basic")  # scatter traces only


@router.get("/sweeps/{sweep_id}")
def sweep_page(sweep_id: Id) -> HTMLResponse:
    return _page("sweep", "sweep.js", charts="full")  # parallel coordinates


@router.get("/vendor/plotly.min.js")
def plotly_js() -> FileResponse:
    return FileResponse(PLOTLY_JS, media_type="text/javascript", headers=CACHE)


@router.get("/vendor/plotly-basic.min.js")
def plotly_basic_js() -> FileResponse:
    """The basic bundle (service/vendor.py), or the full one where it was not fetched."""
    path = PLOTLY_BASIC if PLOTLY_BASIC.exists() else PLOTLY_JS
    return FileResponse(path, media_type="text/javascript", headers=CACHE)


def mount(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

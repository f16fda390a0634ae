"""The web dashboard: static pages that read the public JSON API with the user's token.

The pages hold no data and need no token to load; every number on them comes from /v1/...
with the token the user typed into the sign-in form (kept in the tab's sessionStorage, sent
as a bearer header, never in a URL). Charts are drawn by plotly.js, served from the `plotly`
package installed by pip, so no third-party code lives in this repository.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import plotly
from fastapi import APIRouter, FastAPI
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
CACHE = {"Cache-Control": "public, max-age=86400"}

router = APIRouter(include_in_schema=False)
Id = Annotated[int, PathParam(ge=1, le=2**31 - 1)]


SHELL = (STATIC / "page.html").read_text()
PRELOAD = '  <link rel="preload" href="/vendor/plotly.min.js" as="script">\n'


def _page(title: str, script: str, charts: bool) -> HTMLResponse:
    """One HTML shell for every page: a title, the page's module, plotly preloaded if it
    draws charts."""
    html = SHELL.replace("{title}", title).replace("{script}", script)
    html = html.replace("{preload}", PRELOAD if charts else "")
    return HTMLResponse(html, headers={"Cache-Control": "no-cache"})


@router.get("/")
def home() -> HTMLResponse:
    return _page("runs", "home.js", charts=False)


@router.get("/jobs/{job_id}")
def job_page(job_id: Id) -> HTMLResponse:
    return _page("job", "job.js", charts=True)


@router.get("/sweeps/{sweep_id}")
def sweep_page(sweep_id: Id) -> HTMLResponse:
    return _page("sweep", "sweep.js", charts=True)


@router.get("/vendor/plotly.min.js")
def plotly_js() -> FileResponse:
    return FileResponse(PLOTLY_JS, media_type="text/javascript", headers=CACHE)


def mount(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

"""The dashboard in a real browser (Debian's Chromium via Playwright) against the live service
on the session's real Ray cluster: sign-in, the run list, a live run whose chart grows while it
trains, cancel from the page, a job's log followed live, its artifacts downloaded by signed
link and deleted, a finished sweep's comparison chart, owners (shown, "mine only", buttons only
for a token that may use them); and, against the API alone, a job's throughput figures and
charts (MFU, TFLOP/s, tokens / s) shown only when reported. Screenshots land in
artifacts/screenshots/."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from service.client import Client
from service.models import TERMINAL, Job
from workers.logs import JobLog

from .conftest import ADMIN, ARTIFACTS
from .live import TINY, wait_for, wait_for_sweep

LARGE_MONITOR = {"width": 2560, "height": 1440}
# Assertions wait as long as page actions (the page fixture's 30 s), not Playwright's 5 s: on
# 2 cores shared with the training jobs these tests run, a sign-in once took longer than 5 s.
expect.set_options(timeout=30_000)


def base_url(service) -> str:
    return f"http://127.0.0.1:{service[0].settings.port}"


def sign_in(page, url: str, token: str = ADMIN) -> None:
    page.goto(url)
    page.fill("#token", token)
    page.click("#signin button[type=submit]")
    expect(page.locator("#signin")).to_have_count(0)


def points_in(page, chart: str, trace: int = 0) -> int:
    return page.evaluate(
        "([id, i]) => { const d = document.getElementById(id).data; "
        "return d && d[i] ? d[i].x.length : 0; }",
        [chart, trace],
    )


def test_sign_in_rejects_a_bad_token_and_never_puts_one_in_a_url(service, page):
    urls = []
    page.on("request", lambda r: urls.append(r.url))
    page.goto(base_url(service) + "/")
    field = page.locator("#token")
    assert field.get_attribute("type") == "password"
    field.fill("nst_not_a_real_token")
    page.click("#signin button[type=submit]")
    expect(page.get_by_role("alert")).to_contain_text("not accepted")
    sign_in(page, base_url(service) + "/")
    expect(page.locator("h1")).to_have_text("Runs")
    assert urls and not [u for u in urls if "nst_" in u]


def test_missing_job_and_sweep_pages_say_so(service, page):
    sign_in(page, base_url(service) + "/jobs/987654")
    expect(page.get_by_role("alert")).to_contain_text("Job 987654 does not exist")
    page.goto(base_url(service) + "/sweeps/987654")
    expect(page.get_by_role("alert")).to_contain_text("Sweep 987654 does not exist")


def test_live_run_chart_grows_then_cancel_from_the_page_and_the_list_shows_it(service, page):
    _, client = service
    spec = {**TINY, "num_workers": 1, "micro_batch_size": 256, "max_steps": 1_000_000}
    spec["log_every"] = 1
    job = client.submit(spec, name="browser-live")
    wait_for(lambda: client.job(job["id"])["last_step"] >= 1, timeout=180)

    sign_in(page, base_url(service) + f"/jobs/{job['id']}")
    expect(page.locator("#status [data-status]")).to_have_attribute("data-status", "running")
    page.wait_for_function("document.body.dataset.drawn === 'true'")
    first = points_in(page, "chart-loss")
    # Points arrive over server-sent events and are appended to the drawn chart.
    page.wait_for_function(
        "n => document.getElementById('chart-loss').data[0].x.length > n + 20", arg=first
    )
    assert client.job(job["id"])["status"] == "running"
    for chart in ("chart-lr", "chart-throughput", "chart-state", "chart-grad_norm"):
        assert points_in(page, chart) > 0, chart
    # Where it stands: its rate and its estimated end, re-read while it runs.
    running = re.compile(r"Running on 1 worker: [0-9.]+ steps/s, ends in ~")
    expect(page.locator("#message")).to_contain_text(running)

    # A job that cannot fit beside it waits; its page and its row say where and why.
    waiting = client.submit(
        {**TINY, "num_workers": 4, "micro_batch_size": 64}, name="browser-waits"
    )
    try:
        wait_for(lambda: client.job(waiting["id"])["pending_reason"], timeout=60)
        page.goto(base_url(service) + f"/jobs/{waiting['id']}")
        expect(page.locator("#message")).to_contain_text(
            re.compile(r"Waiting: #1 in the queue; .*needs 4 CPUs, \d+ free")
        )
        page.goto(base_url(service) + "/")
        row = page.locator(f"#jobs-table tr[data-job='{waiting['id']}']")
        expect(row.locator(".when")).to_contain_text("#1")
        expect(page.locator(f"#jobs-table tr[data-job='{job['id']}'] .when")).to_contain_text(
            re.compile(r"~.+ left")
        )
    finally:
        client.cancel(waiting["id"])
    page.goto(base_url(service) + f"/jobs/{job['id']}")
    expect(page.locator("#message")).to_contain_text(running)

    page.click("#cancel")
    expect(page.locator("#status [data-status]")).to_have_attribute(
        "data-status", "cancelled", timeout=90_000
    )
    expect(page.locator("#events")).to_contain_text("cancelled")
    assert client.job(job["id"])["status"] == "cancelled"
    expect(page.locator("#cancel")).to_be_disabled()
    expect(page.locator("#retry")).to_be_enabled()

    page.goto(base_url(service) + "/")
    row = page.locator(f"#jobs-table tr[data-job='{job['id']}']")
    expect(row).to_contain_text("browser-live")
    expect(row).to_contain_text("adan")
    expect(row.locator("[data-status]")).to_have_attribute("data-status", "cancelled")
    page.select_option("#filter-status", "succeeded")
    expect(row).to_have_count(0)
    page.select_option("#filter-status", "cancelled")
    expect(row).to_have_count(1)
    page.fill("#filter-text", "no-such-name")
    expect(page.locator("#jobs .notice")).to_contain_text("No job matches")


def run_dir_of(live, job_id: int) -> str | None:
    """The job's run directory once the scheduler has started it (the API does not show it)."""
    with live.app.state.db.sessions() as db:
        job = db.get(Job, job_id)
        return job.run_dir if job.status == "running" else None


def line(panel, text: str):
    """The panel's line that reads exactly `text` (a worker may still print lines of its own)."""
    return panel.locator("span", has_text=re.compile("^" + re.escape(text) + "$"))


def scrolled_to_end(page, selector: str) -> bool:
    return page.evaluate(
        "s => { const e = document.querySelector(s); "
        "return e.scrollHeight - e.scrollTop - e.clientHeight < 8; }",
        selector,
    )


# A user's model that prints once a file exists: the test makes the file after the page is
# following the job's log, so only the live stream can bring the printed line to the page.
PRINTER = """
import os

from torch import nn


class Printer(nn.Module):
    def __init__(self, d, classes, when):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, classes))
        self.when, self.printed = when, False

    def forward(self, x):
        if not self.printed and os.path.exists(self.when):
            self.printed = True
            print("the job printed this after the page was following")
        return self.body(x)


def build(data, when):
    return Printer(data.train[0][0].shape[0], data.num_classes or 10, when)
"""


def test_log_panel_follows_a_running_job_and_leaves_a_reader_where_they_scrolled(
    service, page, tmp_path
):
    live, client = service
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "dashboard_printer.py").write_text(PRINTER)
    package = client.ensure_package(tmp_path / "project")
    when = tmp_path / "print-now"
    spec = {**TINY, "num_workers": 1, "micro_batch_size": 256, "max_steps": 1_000_000}
    spec |= {
        "code": package,
        "model": {"factory": "dashboard_printer:build", "kwargs": {"when": str(when)}},
    }
    job = client.submit(spec, name="browser-log")
    try:
        run_dir = wait_for(lambda: run_dir_of(live, job["id"]), timeout=180)
        # The job's own start-up lines (the driver's "Connected to Ray cluster", the workers')
        # are written before its first step: the lines below come after them, not among them.
        wait_for(lambda: client.job(job["id"])["last_step"] >= 1, timeout=180)
        log = JobLog(Path(run_dir) / "logs")
        sign_in(page, base_url(service) + f"/jobs/{job['id']}")
        panel = page.locator("#log")
        expect(panel).to_have_attribute("data-state", "following")
        expect(page.locator("#artifacts")).not_to_contain_text("Loading")
        expect(page.locator("#delete-artifacts")).to_have_count(0)  # not while it runs

        # The job's own print, made after the page is following.
        when.touch()
        printed = "[rank 0] the job printed this after the page was following"
        expect(line(panel, printed)).to_have_count(1)

        # Each line is written after the page is following: only the stream can bring it.
        # Terminal colour codes (Ray writes some) are not shown.
        log.append(["[rank 0] \x1b[1m\x1b[32mhello\x1b[39m\x1b[22m from the test"])
        expect(line(panel, "[rank 0] hello from the test")).to_have_count(1)
        log.append([f"[rank 0] line {i}" for i in range(200)])
        expect(line(panel, "[rank 0] line 199")).to_have_count(1)
        assert scrolled_to_end(page, "#log")  # it kept up with the new lines

        panel.evaluate("e => { e.scrollTop = 0; }")  # the reader goes back up
        log.append(["[rank 0] written while the reader is scrolled up"])
        expect(line(panel, "[rank 0] written while the reader is scrolled up")).to_have_count(1)
        assert panel.evaluate("e => e.scrollTop") == 0
        assert panel.evaluate("e => e.scrollHeight > e.clientHeight")  # bounded, scrollable

        # The job's end closes the log stream and lists the artifacts again, now deletable.
        client.cancel(job["id"])
        expect(panel).to_have_attribute("data-state", "complete", timeout=120_000)
        expect(page.locator("#delete-artifacts")).to_be_visible()
    finally:
        if client.job(job["id"])["status"] not in TERMINAL:
            client.cancel(job["id"])
        wait_for(lambda: client.job(job["id"])["status"] in TERMINAL, timeout=120)


def test_finished_job_shows_its_log_and_artifacts_downloaded_by_signed_link(service, page):
    _, client = service
    spec = {**TINY, "num_workers": 1, "max_steps": 6, "eval_every": 3, "checkpoint_every": 3}
    job = client.submit(spec, name="browser-artifacts")
    done = wait_for(
        lambda: (j := client.job(job["id"]))["status"] in TERMINAL and j, timeout=300, every=1.0
    )
    assert done["status"] == "succeeded", done

    sign_in(page, base_url(service) + f"/jobs/{job['id']}")
    # A finished job's log is read page by page. The driver's last line, its result, reaches
    # the log a moment after the job is marked ended: the panel reads on for a few seconds.
    expect(page.locator("#log")).to_have_attribute("data-state", "complete")
    expect(page.locator("#log")).to_contain_text('[driver] {"status": "succeeded"')

    table = page.locator("#artifacts-table")
    final = table.locator("tbody[data-step='final']")
    for name in ("model.pt", "optimizer.pt", "spec.json", "result.json", "metrics.csv"):
        expect(final.locator(f"a[download='{name}']")).to_have_text(name)
    checkpoint = table.locator("tbody[data-step='3']")
    expect(checkpoint).to_contain_text("Checkpoint at step 3")
    expect(checkpoint.locator("a[download='step-3-model.pt']")).to_have_count(1)
    listed = {a["name"]: a for a in client.artifacts(job["id"])["data"]}
    row = final.locator("tr[data-artifact='model.pt']")
    size = int(row.locator("td.num").get_attribute("title").split()[0])
    assert size == listed["model.pt"]["size"]
    assert row.locator("code").get_attribute("title") == listed["model.pt"]["sha256"]

    # The link is signed: the browser fetches it without the bearer token.
    href = row.locator("a").get_attribute("href")
    fetched = page.evaluate(
        "async (u) => { const r = await fetch(u); "
        "return [r.status, (await r.arrayBuffer()).byteLength]; }",
        href,
    )
    assert fetched == [200, size]
    with page.expect_download() as download:
        row.locator("a").click()
    assert download.value.suggested_filename == "model.pt"
    assert Path(download.value.path()).stat().st_size == size

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#delete-artifacts")
    expect(page.locator("#artifacts")).to_contain_text("Artifacts deleted at")
    expect(page.locator("#delete-artifacts")).to_have_count(0)
    assert client.artifacts(job["id"])["deleted_at"] is not None
    gone = page.evaluate("async (u) => (await fetch(u)).status", href)
    assert gone == 410


@pytest.fixture(scope="module")
def finished_sweep(service):
    """{adan, adamw, lamb} x {256, 512}: a real sweep, run to the end on the cluster, each
    trial stopping at a (low) target or at its sixth step."""
    _, client = service
    base = {
        **TINY,
        "num_workers": 1,
        "max_steps": 6,
        "eval_every": 3,
        "stop_at": {"metric": "val_accuracy", "value": 0.2},
    }
    sweep = client.sweep(
        {
            "name": "browser-compare",
            "base": base,
            "max_concurrent": 4,
            "space": {"optimizer.name": ["adan", "adamw", "lamb"], "batch_size": [256, 512]},
        }
    )
    done = wait_for_sweep(client, sweep["id"], timeout=500)
    assert done["status"] == "succeeded", done
    return done


def test_finished_sweep_compares_optimizers_across_batch_sizes(service, page, finished_sweep):
    sweep_id = finished_sweep["id"]
    sign_in(page, base_url(service) + f"/sweeps/{sweep_id}")
    page.wait_for_function("document.body.dataset.drawn === 'true'")
    # The plotted values are the trials' final metrics as the API reports them; accuracy is
    # the default comparison, the metric picker switches it.
    for metric in ("val_accuracy", "val_loss"):
        page.select_option("#metric", metric)
        page.wait_for_function(
            "m => document.getElementById('chart-batch').layout.title.text.includes(m)", arg=metric
        )
        traces = page.evaluate(
            "() => document.getElementById('chart-batch').data"
            ".map(t => ({name: t.name, x: t.x, y: t.y}))"
        )
        assert sorted(t["name"] for t in traces) == ["adamw", "adan", "lamb"]
        finals = {
            (trial["varied"]["optimizer.name"], trial["varied"]["batch_size"]): trial["final"][
                metric
            ]
            for trial in finished_sweep["trials_summary"]
        }
        for t in traces:
            assert t["x"] == [256, 512], t
            assert t["y"] == [finals[(t["name"], 256)], finals[(t["name"], 512)]], t

    curves = page.evaluate(
        "() => document.getElementById('chart-curves').data.map(t => t.legendgroup)"
    )
    assert sorted(curves) == ["adamw", "adamw", "adan", "adan", "lamb", "lamb"]
    assert page.evaluate("() => document.getElementById('chart-params').data[0].type") == (
        "parcoords"
    )

    # Its target: steps to it per (optimizer, batch) at the best lr, as the API's cells say,
    # and the same on log-log axes beside the perfect-scaling line.
    expect(page.locator("#targets")).to_be_visible()
    for cell in finished_sweep["cells"]:
        where = f"#cells-table td[data-cell='{cell['optimizer']}|{cell['batch_size']}']"
        text = page.locator(where).inner_text()
        steps = cell["steps_to_target"]
        assert text == "not reached" if steps is None else text.startswith(f"{steps:g} (lr "), text
    names = page.evaluate("() => document.getElementById('chart-steps').data.map(t => t.name)")
    reached = {c["optimizer"] for c in finished_sweep["cells"] if c["steps_to_target"]}
    assert set(names) == reached | ({"perfect scaling"} if reached else set())

    rows = page.locator("#trials-table tbody tr")
    expect(rows).to_have_count(6)
    page.click("#trials-table th[data-key='val_loss']")
    shown = [float(v) for v in rows.locator("td:last-child").all_inner_texts()]
    assert shown == sorted(shown)
    page.click("#trials-table th[data-key='val_loss']")
    shown = [float(v) for v in rows.locator("td:last-child").all_inner_texts()]
    assert shown == sorted(shown, reverse=True)


def test_pages_fit_laptop_and_large_monitor_widths(service, browser, finished_sweep):
    shots = ARTIFACTS / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    job_id = finished_sweep["trials_summary"][0]["job_id"]
    for size in ({"width": 1280, "height": 800}, LARGE_MONITOR):
        context = browser.new_context(viewport=size)
        page = context.new_page()
        sign_in(page, base_url(service) + "/")
        for path in ("/", f"/jobs/{job_id}", f"/sweeps/{finished_sweep['id']}"):
            page.goto(base_url(service) + path)
            if path != "/":
                page.wait_for_function("document.body.dataset.drawn === 'true'")
            else:
                expect(page.locator("#jobs-table")).to_be_visible()
            overflow = page.evaluate(
                "() => document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, (path, size)
            name = path.strip("/").replace("/", "-") or "home"
            page.screenshot(path=str(shots / f"{name}-{size['width']}.png"), full_page=True)
        context.close()


@pytest.fixture(scope="module")
def people(service):
    """Two users besides the admin: vera may only read, olga may read and submit; each as
    (token, Client)."""
    live, admin = service
    made = {}
    for name, scopes in (("vera", ["read"]), ("olga", ["read", "submit"])):
        user = admin._call("POST", "/v1/users", json={"name": name, "scopes": scopes})
        made[name] = (user["token"], Client(live.url, user["token"]))
    return made


def test_owner_is_shown_and_only_a_token_that_may_act_sees_the_buttons(service, page, people):
    _, admin = service
    vera_token, _ = people["vera"]
    olga_token, olga = people["olga"]
    spec = {**TINY, "num_workers": 1, "micro_batch_size": 256, "max_steps": 1_000_000}
    job = olga.submit(spec, name="olgas-run")
    url = base_url(service) + f"/jobs/{job['id']}"
    try:
        # vera (read only) sees whose it is, and no button she could not use.
        sign_in(page, base_url(service) + "/", vera_token)
        row = page.locator(f"#jobs-table tr[data-job='{job['id']}']")
        expect(row.locator("td.owner")).to_have_text("olga")
        page.goto(url)
        expect(page.locator("#owner")).to_have_text("olga")
        for button in ("#cancel", "#retry"):
            expect(page.locator(button)).to_be_hidden()
        # Shown anyway (a page older than a change of scopes), the service's refusal is shown.
        page.evaluate("document.getElementById('cancel').hidden = false")
        page.click("#cancel")
        expect(page.get_by_role("alert")).to_contain_text("lacks the 'submit' scope")
        assert admin.job(job["id"])["status"] in ("queued", "running")

        # olga, its owner, cancels it from the page once it runs (so that it leaves artifacts).
        page.click("#signout")
        sign_in(page, url, olga_token)
        expect(page.locator("#status [data-status]")).to_have_attribute(
            "data-status", "running", timeout=180_000
        )
        page.click("#cancel")
        expect(page.locator("#status [data-status]")).to_have_attribute(
            "data-status", "cancelled", timeout=90_000
        )
        expect(page.locator("#retry")).to_be_visible()
        expect(page.locator("#delete-artifacts")).to_be_visible()

        # The ended job's artifacts are listed for vera too, without a delete button.
        page.click("#signout")
        sign_in(page, url, vera_token)
        expect(page.locator("#artifacts-table")).to_be_visible()
        expect(page.locator("#delete-artifacts")).to_have_count(0)
        expect(page.locator("#retry")).to_be_hidden()
    finally:
        if admin.job(job["id"])["status"] not in TERMINAL:
            admin.cancel(job["id"])
        wait_for(lambda: admin.job(job["id"])["status"] in TERMINAL, timeout=120)


def test_mine_only_lists_the_signed_in_users_jobs_and_sweeps(service, page, people):
    _, admin = service
    olga_token, olga = people["olga"]
    spec = {**TINY, "num_workers": 1, "max_steps": 2}
    # Cancelled at once: they need not run to be listed.
    hers = olga.cancel(olga.submit(spec, name="olgas-mine")["id"])
    theirs = admin.cancel(admin.submit(spec, name="admins-not-hers")["id"])
    sweep = admin.sweep({"name": "admins-sweep", "base": spec, "space": {"batch_size": [256]}})
    admin.cancel_sweep(sweep["id"])

    sign_in(page, base_url(service) + "/", olga_token)
    her_row = page.locator(f"#jobs-table tr[data-job='{hers['id']}']")
    their_row = page.locator(f"#jobs-table tr[data-job='{theirs['id']}']")
    sweep_row = page.locator(f"#sweeps-table tr[data-sweep='{sweep['id']}']")
    expect(their_row.locator("td.owner")).to_have_text("admin")
    expect(sweep_row.locator("td.owner")).to_have_text("admin")
    expect(her_row).to_have_count(1)

    page.check("#mine")
    expect(their_row).to_have_count(0)
    expect(her_row.locator("td.owner")).to_have_text("olga")
    assert set(page.locator("#jobs-table td.owner").all_inner_texts()) == {"olga"}
    expect(page.locator("#sweeps .notice")).to_contain_text("No sweep matches")
    page.uncheck("#mine")
    expect(their_row).to_have_count(1)

    # Another user's sweep: olga sees whose it is and no cancel button; the admin has one.
    page.goto(base_url(service) + f"/sweeps/{sweep['id']}")
    expect(page.locator("#owner")).to_have_text("submitted by admin")
    expect(page.locator("#cancel")).to_be_hidden()
    page.click("#signout")
    sign_in(page, base_url(service) + f"/sweeps/{sweep['id']}")
    expect(page.locator("#owner")).to_have_text("submitted by admin")
    expect(page.locator("#cancel")).to_be_visible()


def ingest_as_admin(live, job_id: int, points: list[dict], status: str | None = None) -> None:
    """Metric points (and a status) sent as a tool would: an admin token may ingest."""
    r = httpx.post(
        f"{live.url}/v1/jobs/{job_id}/ingest",
        json={"points": points, "status": status},
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text


def test_job_page_shows_mfu_tflops_and_tokens_and_hides_what_a_job_does_not_report(
    api_server, page
):
    # The API alone (no scheduler): the test reports the jobs' metrics and status itself.
    live, client = api_server
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # A finished GPU language-model job with 3000 reports: the charts get a downsampled
    # series (each bucket's extremes); the figures still show the last report, which is
    # neither extreme of its bucket (2998 holds the high, 2999 the low), and no live stream
    # brings it (the job has ended).
    lm = client.submit({**TINY, "num_workers": 1}, name="gpu-lm")

    def report(step: int) -> dict[str, float]:
        high, low = step % 3 == 1, step % 3 == 2  # steps 2998, 2999
        if step == 3000:
            return {"tflops": 312.0, "mfu": 0.412, "tokens_per_s": 1.2e6, "samples_per_s": 9375}
        tflops = 330.0 if high else 290.0 if low else 300.0
        return {
            "tflops": tflops,
            "mfu": tflops / 757,
            "tokens_per_s": 1.1e6,
            "samples_per_s": 9000.0,
        }

    points = [{"step": s, "values": report(s)} for s in range(1, 3001)]
    ingest_as_admin(live, lm["id"], points, status="running")
    ingest_as_admin(live, lm["id"], [], status="succeeded")
    sign_in(page, base_url(api_server) + f"/jobs/{lm['id']}")
    expect(page.locator("#status [data-status]")).to_have_attribute("data-status", "succeeded")
    page.wait_for_function("document.body.dataset.drawn === 'true'")
    figures = page.locator("#pace")
    expect(figures.locator("[data-key=mfu] dt")).to_have_text("MFU")
    expect(figures.locator("[data-key=mfu] dd")).to_have_text("41%")
    expect(figures.locator("[data-key=tflops] dt")).to_have_text("TFLOP/s")
    expect(figures.locator("[data-key=tflops] dd")).to_have_text("312")
    expect(figures.locator("[data-key=tokens_per_s] dd")).to_have_text("1.2M")
    expect(figures.locator("[data-key=samples_per_s] dd")).to_have_text("9.38K")
    for chart in ("flops", "mfu", "tokens", "throughput"):
        expect(page.locator(f"#card-{chart}")).to_be_visible()
        assert 0 < points_in(page, f"chart-{chart}") <= 2000, chart  # downsampled

    # A CPU job of a classifier: no peak, so no MFU, and no tokens. Those charts and figures
    # are absent, not empty.
    cpu = client.submit({**TINY, "num_workers": 1}, name="cpu-mlp")
    ingest_as_admin(
        live,
        cpu["id"],
        [{"step": s, "values": {"samples_per_s": 800.0, "tflops": 0.002}} for s in (1, 2)],
    )
    page.goto(base_url(api_server) + f"/jobs/{cpu['id']}")
    page.wait_for_function("document.body.dataset.drawn === 'true'")
    expect(figures.locator("[data-key=tflops] dd")).to_have_text("0.002")
    expect(figures.locator("[data-key=mfu]")).to_have_count(0)
    expect(figures.locator("[data-key=tokens_per_s]")).to_have_count(0)
    expect(page.locator("#card-flops")).to_be_visible()
    for chart in ("mfu", "tokens"):
        expect(page.locator(f"#card-{chart}")).to_be_hidden()

    # A report with MFU, sent while the page follows the (still queued) job: it appears live.
    ingest_as_admin(live, cpu["id"], [{"step": 3, "values": {"tflops": 0.5, "mfu": 0.05}}])
    expect(figures.locator("[data-key=mfu] dd")).to_have_text("5.0%")
    expect(page.locator("#card-mfu")).to_be_visible()
    assert points_in(page, "chart-mfu") == 1
    # Drawn while hidden (Plotly's default 700 px wide), sized to its card once shown.
    page.wait_for_function(
        "() => { const d = document.getElementById('chart-mfu'); "
        "const drawn = d.querySelector('.main-svg').getAttribute('width'); "
        "return Math.abs(drawn - d.clientWidth) <= 1; }"
    )
    assert errors == []


def test_job_page_names_the_optimizer_states_precision_and_charts_its_bytes_per_parameter(
    api_server, page
):
    """A job whose optimizer keeps int8 state: the summary and the jobs list say so, and the
    state chart plots the bytes per parameter it reported, titled with the precision."""
    live, client = api_server
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    spec = {**TINY, "num_workers": 1, "optimizer": {**TINY["optimizer"], "state_precision": "int8"}}
    job = client.submit(spec, name="int8-state")
    stored = client.job(job["id"])["spec"]["optimizer"]
    assert stored["state_precision"] == "int8"
    points = [
        {"step": s, "values": {"opt_state_bytes_per_param": 4.06, "opt_state_bytes": 4.06e6}}
        for s in (1, 2, 3)
    ]
    ingest_as_admin(live, job["id"], points, status="running")
    sign_in(page, base_url(api_server) + f"/jobs/{job['id']}")
    page.wait_for_function("document.body.dataset.drawn === 'true'")
    expect(page.locator("dl.summary")).to_contain_text("adan (int8)")
    card = page.locator("#card-state_per_param")
    expect(card).to_be_visible()
    expect(card).to_contain_text("optimizer state (int8), bytes per parameter")
    assert points_in(page, "chart-state_per_param") == 3

    # The home page's list shows the precision beside the optimizer's name.
    page.goto(base_url(api_server) + "/")
    expect(page.locator("tr", has_text="int8-state")).to_contain_text("adan (int8)")
    assert errors == []


def test_an_elastic_jobs_page_shows_its_size_and_resizes_it(api_server, page, tmp_path):
    """The API alone: the test plays the job's workers. A running elastic job's page shows
    "2 of 1–3" workers and a Resize control; asking for 3 writes the request the job's rank
    0 reads, and an out-of-range number is refused with the API's reason."""
    from workers.elastic import read_resize

    live, client = api_server
    job = client.submit({**TINY, "num_workers": {"min": 1, "max": 3}}, name="elastic-page")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with live.app.state.db.sessions() as db:  # what the scheduler records at launch
        db.get(Job, job["id"]).run_dir = str(run_dir)
        db.commit()
    r = httpx.post(
        f"{live.url}/v1/jobs/{job['id']}/ingest",
        json={
            "points": [{"step": 1, "values": {"train_loss": 2.0}}],
            "status": "running",
            "world_size": 2,
            "world_reason": "started on 2",
        },
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text

    sign_in(page, base_url(api_server) + f"/jobs/{job['id']}")
    expect(page.locator("#summary")).to_contain_text("2 of 1–3")
    expect(page.locator("#resize")).to_be_enabled()
    page.fill("#resize-workers", "3")
    page.click("#resize")
    expect(page.locator("#message")).to_contain_text("Asked to go on with 3 workers")
    asked = read_resize(run_dir)
    assert (asked.num_workers, asked.reason) == (3, "resized by admin")
    page.fill("#resize-workers", "7")
    page.click("#resize")
    expect(page.locator("#message")).to_contain_text("outside job")

    page.goto(base_url(api_server) + "/")
    row = page.locator(f"#jobs-table tr[data-job='{job['id']}']")
    expect(row).to_contain_text("2 of 1–3")
    client.cancel(job["id"])

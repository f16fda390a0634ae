"""The API under ordinary pressure, against a live server (uvicorn on loopback, SQLite, no
Ray): many open job pages, reconnecting viewers, bodies without tokens or without lengths."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack

import httpx

from ..helpers import worker_token
from .conftest import ADMIN
from .test_api import SPEC

AUTH = {"Authorization": f"Bearer {ADMIN}"}


def run(coro) -> object:
    """asyncio.run in a thread of its own: the session's browser (Playwright's sync API)
    keeps an event loop running in the main thread."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class Sse:
    """Server-sent events read from an httpx streaming response, one message at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()
        self.comments = 0

    async def next(self) -> dict[str, str]:
        message: dict[str, str] = {}
        async for line in self.lines:
            if not line:
                if message:
                    return message
                continue
            if line.startswith(":"):
                self.comments += 1
                continue
            field, _, value = line.partition(":")
            message[field] = value.strip()
        raise EOFError("stream closed")

    async def until(self, event: str, timeout: float = 20.0) -> dict[str, str]:
        async def wait() -> dict[str, str]:
            while (m := await self.next()).get("event") != event:
                pass
            return m

        return await asyncio.wait_for(wait(), timeout)


def ingest(live, job_id: int, steps, status: str | None = None) -> None:
    token = worker_token(live.app, job_id)
    body = {"points": [{"step": s, "values": {"train_loss": 1.0 / s}} for s in steps]}
    if status:
        body["status"] = status
    r = httpx.post(
        f"{live.url}/v1/jobs/{job_id}/ingest",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 200, r.text


def prometheus(live, name: str) -> float:
    text = httpx.get(f"{live.url}/metrics", headers=AUTH).text
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def test_thirty_open_job_pages_hold_no_database_connection_and_all_see_new_points(api_server):
    """Each open stream used to keep a pooled connection (5 + 10) for its whole life: a
    handful of tabs and every request stalled, then failed."""
    live, client = api_server
    job = client.submit(SPEC, name="watched")

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=30)
            )
            streams = []
            for _ in range(30):
                resp = await stack.enter_async_context(
                    http.stream("GET", f"/v1/jobs/{job['id']}/events")
                )
                assert resp.status_code == 200
                streams.append(Sse(resp))
            for sse in streams:
                assert json.loads((await sse.until("status"))["data"])["status"] == "queued"
            hub = live.app.state.streams
            assert hub.feeds[job["id"]].viewers == 30  # one poller for the thirty

            # The service answers everything else while they are open.
            health = await http.get("/healthz", timeout=5)
            assert health.json() == {"status": "ok"}
            listing = await http.get("/v1/jobs", timeout=10)
            assert listing.status_code == 200 and listing.json()["count"] >= 1
            in_use = await asyncio.to_thread(prometheus, live, "nestor_db_connections_in_use")
            assert in_use <= 2  # the /metrics request's own, at most one more

            await asyncio.to_thread(ingest, live, job["id"], [1, 2, 3])
            for sse in streams:
                points = json.loads((await sse.until("metrics"))["data"])
                assert [p["step"] for p in points] == [1, 2, 3]

    run(scenario())
    deadline = time.time() + 10
    while live.app.state.streams.feeds and time.time() < deadline:
        time.sleep(0.1)
    assert not live.app.state.streams.feeds  # closed pages stop their poller


def test_forty_job_pages_opening_at_once_are_all_answered(api_server):
    """Forty pages opening together send ~600 requests at once, far more than the pool's 15
    connections and the 40 worker threads: every one is answered, and soon. (A request's
    session used to live until after its response, which FastAPI builds in the thread pool:
    pool threads waited for connections that only responses queued behind them would free,
    and requests failed with a 500 after the pool's 30 s timeout.)"""
    live, client = api_server
    job = client.submit(SPEC, name="opened")
    ingest(live, job["id"], list(range(1, 3001)))
    base = f"/v1/jobs/{job['id']}"
    page = [base, f"{base}/events/history", "/v1/me", f"{base}/artifacts", "/v1/jobs"]
    charts = [f"{base}/metrics?keys={key}&max_points=2000" for key in ("train_loss", "lr")]
    page += charts * 5

    async def scenario() -> list[int]:
        limits = httpx.Limits(max_connections=1000)
        async with httpx.AsyncClient(
            base_url=live.url, headers=AUTH, timeout=25, limits=limits
        ) as http:
            answers = await asyncio.gather(*[http.get(path) for _ in range(40) for path in page])
        return [r.status_code for r in answers]

    started = time.perf_counter()
    codes = run(scenario())
    assert len(codes) == 40 * len(page) and set(codes) == {200}
    assert time.perf_counter() - started < 25  # the pool's timeout is 30 s


def test_streams_per_token_are_capped_with_a_clear_429(api_server):
    live, client = api_server
    job = client.submit(SPEC, name="capped")
    limit = live.settings.max_streams_per_token

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=30)
            )
            url = f"/v1/jobs/{job['id']}/events"
            opened = [
                await stack.enter_async_context(http.stream("GET", url)) for _ in range(limit)
            ]
            assert all(r.status_code == 200 for r in opened)
            refused = await http.get(url)
            assert refused.status_code == 429
            assert f"already has {limit} live streams open" in refused.json()["detail"]
            assert refused.headers["retry-after"]
            await opened[0].aclose()

            async def status_of_a_new_stream() -> int:
                async with http.stream("GET", url) as resp:
                    return resp.status_code

            for _ in range(50):  # the slot is released when the stream ends
                if (code := await status_of_a_new_stream()) != 429:
                    break
                await asyncio.sleep(0.1)
            assert code == 200

    run(scenario())


def test_a_reconnecting_viewer_resumes_after_its_last_event_id(api_server):
    live, client = api_server
    job = client.submit(SPEC, name="resume")
    ingest(live, job["id"], [1, 2, 3])

    async def read(headers: dict[str, str]) -> tuple[list[dict], str]:
        async with (
            httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=30) as http,
            http.stream("GET", f"/v1/jobs/{job['id']}/events", headers=headers) as resp,
        ):
            sse = Sse(resp)
            seen = [await sse.next()]
            while seen[-1].get("event") != "metrics":
                seen.append(await asyncio.wait_for(sse.next(), 20))
            return seen, seen[-1]["id"]

    first, last_id = run(read({}))
    assert [m["event"] for m in first] == ["status", "metrics"]
    assert all(m.get("id") for m in first)
    ingest(live, job["id"], [4, 5, 6])
    again, _ = run(read({"Last-Event-ID": last_id}))
    assert [m["event"] for m in again] == ["metrics"]  # the status was seen already
    assert [p["step"] for p in json.loads(again[0]["data"])] == [4, 5, 6]


def test_idle_streams_get_keep_alive_comments_and_end_when_the_job_ends(api_server):
    live, client = api_server
    job = client.submit(SPEC, name="idle")

    async def scenario() -> int:
        async with (
            httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=30) as http,
            http.stream("GET", f"/v1/jobs/{job['id']}/events") as resp,
        ):
            sse = Sse(resp)
            await sse.until("status")
            waiting = asyncio.ensure_future(sse.until("end", timeout=30))
            await asyncio.sleep(2.0)  # idle: only keep-alive comments (every 0.5 s here)
            comments = sse.comments
            await asyncio.to_thread(client.cancel, job["id"])
            await waiting
            return comments

    assert run(scenario()) >= 2


# ------------------------------------------------------------------------ request bodies
def raw_request(live, head: str, chunks: list[bytes], wait: float = 10.0) -> str:
    """Send a request head and some body chunks over a raw socket without finishing the
    body, and return whatever the server answers within ``wait`` seconds."""
    with socket.create_connection(("127.0.0.1", live.settings.port), timeout=wait) as sock:
        sock.sendall(head.encode())
        for chunk in chunks:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered and closed: read what it said
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except (TimeoutError, ConnectionResetError):
            pass
        return answer.decode(errors="replace")


def chunked_head(port: int, token: str | None) -> str:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )


def test_a_chunked_body_without_a_token_is_refused_before_it_is_read(api_server):
    """No Content-Length and no token: the server used to read the whole body (however
    long) before it looked at the token."""
    live, _ = api_server
    started = time.monotonic()
    answer = raw_request(live, chunked_head(live.settings.port, None), [b"x" * 65536] * 4)
    assert answer.startswith("HTTP/1.1 401"), answer[:200]
    assert "missing bearer token" in answer
    assert time.monotonic() - started < 10  # answered while the body was still open


def test_a_chunked_body_over_the_limit_is_cut_off_with_a_json_413(api_server):
    live, _ = api_server
    limit = live.settings.max_body_bytes
    chunks = [b"x" * 65536] * (limit // 65536 + 4)  # past the limit, never finished
    answer = raw_request(live, chunked_head(live.settings.port, ADMIN), chunks)
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    body = json.loads(answer.split("\r\n\r\n", 1)[1])
    assert body["detail"] == f"request body over {limit} bytes (NESTOR_MAX_BODY_BYTES)"


def test_stream_points_are_written_exactly_as_json_would_write_them():
    from service.streams import points_json

    rows = [
        (1, 1, "train_loss", 0.1),
        (2, 2, 'a "quoted"\\key, ünïcode', None),
        (3, 3, "lr", 1e-16),
        (4, 2**31 - 1, "big", 1.5e300),
        (5, 5, "neg", -0.0),
    ]
    want = [{"step": s, "key": k, "value": v} for _, s, k, v in rows]
    assert points_json(rows) == json.dumps(want).encode()
    assert points_json([]) == b"[]"

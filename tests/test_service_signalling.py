"""Signalling that web pages cannot abuse: the demo page, CORS for listed origins only, JSON-only offers,
a per-address offer limit, and offers that never connect giving their slots back.

Real daemon on a real socket (``run_server``), real aiortc offers; the browser
side of the same rules is in ``test_browser.py``.
"""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from aiortc import RTCPeerConnection

from kfgan_daemon.errors import ConfigError
from kfgan_daemon.service.config import Settings
from test_service_http import metric
from test_webrtc_loopback import ClientPeer, PatternTrack, start_daemon, stop_daemon

TOKEN = "signalling-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
APP_ORIGIN = "http://app.example:8080"
OTHER_ORIGIN = "http://elsewhere.example"
# Every API route, as (method, path) a page would call.
ROUTES = [
    ("POST", "/offer"),
    ("GET", "/streams"),
    ("GET", "/streams/s1"),
    ("DELETE", "/streams/s1"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
]


async def an_offer() -> str:
    """A real browser-like offer (one video section, host candidates) from a peer closed straight after."""
    pc = RTCPeerConnection()
    pc.addTransceiver(PatternTrack(), direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def metrics_text(daemon) -> str:
    async with daemon.http.get(f"{daemon.url}/metrics", headers=daemon.headers) as response:
        return await response.text()


def test_cors_origins_and_rate_limit_are_validated() -> None:
    assert Settings.load().cors_origins == []
    assert Settings.load().offer_rate_limit == "30/minute"
    assert Settings.load(offer_rate_limit="").offer_rate_limit is None
    assert Settings.load(cors_origins=["https://app.example:8443", "http://[::1]:8000"]).cors_origins
    for bad, field in ((["*"], "cors_origins"), (["https://app.example/"], "cors_origins"),
                       (["app.example"], "cors_origins")):
        with pytest.raises(ConfigError, match=f"^{field}: "):
            Settings.load(cors_origins=bad)
    for bad in ("0/minute", "often", "3/fortnight"):
        with pytest.raises(ConfigError, match="^offer_rate_limit: "):
            Settings.load(offer_rate_limit=bad)


async def test_demo_page_is_served_without_the_token() -> None:
    daemon = await start_daemon(token=TOKEN)
    try:
        for path, kind, marker in (("/", "text/html", 'src="demo.js"'), ("/demo.js", "text/javascript", "getUserMedia"),
                                   ("/demo.css", "text/css", "video")):
            async with daemon.http.get(f"{daemon.url}{path}") as response:
                assert response.status == 200, path
                assert response.content_type == kind
                assert marker in await response.text()
                assert "default-src 'self'" in response.headers["Content-Security-Policy"]
        # The page is public; the API behind it is not.
        async with daemon.http.get(f"{daemon.url}/streams") as response:
            assert response.status == 401
    finally:
        await stop_daemon(daemon)


async def test_only_json_offers_are_read() -> None:
    daemon = await start_daemon(token=TOKEN)
    daemon.headers = AUTH
    try:
        text = json.dumps({"sdp": await an_offer(), "type": "offer"})
        # What a page on any origin may send without a preflight, and no Content-Type at all.
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                             None):
            headers = dict(AUTH)
            if content_type is not None:
                headers["Content-Type"] = content_type
            async with daemon.http.post(f"{daemon.url}/offer", data=text.encode(), headers=headers) as response:
                assert response.status == 415, content_type
                answer = await response.json()
                assert answer["reason"] == "unsupported_media_type" and "application/json" in answer["error"]
        assert (await daemon.get_json("/streams"))["sessions"] == []
        assert metric(await metrics_text(daemon), "kfgan_http_request_errors_total", route="/offer",
                      reason="unsupported_media_type") == 4
        # The same body as JSON (charset parameter and all) is answered.
        headers = {**AUTH, "Content-Type": "application/json; charset=utf-8"}
        async with daemon.http.post(f"{daemon.url}/offer", data=text.encode(), headers=headers) as response:
            assert response.status == 200, await response.text()
            session = (await response.json())["session"]
        async with daemon.http.delete(f"{daemon.url}/streams/{session}", headers=AUTH) as response:
            assert response.status == 200
    finally:
        await stop_daemon(daemon)


async def test_offers_are_rate_limited_per_client_address() -> None:
    daemon = await start_daemon(offer_rate_limit="3/minute")
    other = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)))
    try:
        async def post(http: aiohttp.ClientSession) -> aiohttp.ClientResponse:
            async with http.post(f"{daemon.url}/offer", json={"type": "offer"}) as response:
                await response.read()
                return response

        assert [(await post(daemon.http)).status for _ in range(3)] == [400, 400, 400]
        refused = await post(daemon.http)
        assert refused.status == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        # Another address has its own allowance.
        assert (await post(other)).status == 400
        text = await metrics_text(daemon)
        assert metric(text, "kfgan_http_request_errors_total", route="/offer", reason="rate_limited") == 1
    finally:
        await other.close()
        await stop_daemon(daemon)


async def test_never_connecting_offers_leave_no_slot_held() -> None:
    timeout = 2.0
    daemon = await start_daemon(max_streams=4, connect_timeout=timeout, offer_rate_limit="100/minute")
    try:
        sdp = await an_offer()
        statuses = []
        for _ in range(20):
            async with daemon.http.post(f"{daemon.url}/offer", json={"sdp": sdp, "type": "offer"}) as response:
                statuses.append(response.status)
                if response.status != 200:
                    assert (await response.json())["reason"] == "capacity"
        assert statuses.count(200) >= 4 and set(statuses) <= {200, 503}
        # Each session that never connects is closed connect_timeout after its answer.
        await wait_for_sessions(daemon, 0, timeout + 5)
        text = await metrics_text(daemon)
        assert metric(text, "kfgan_webrtc_sessions") == 0
        assert metric(text, "kfgan_engine_streams_open") == 0
        # The slots are really free: max_streams callers get in and get video back.
        peers = [ClientPeer(PatternTrack()) for _ in range(4)]
        try:
            for peer in peers:
                await peer.connect(daemon.http, daemon.url)
            for peer in peers:
                await peer.wait_frames(3)
        finally:
            for peer in peers:
                await peer.close()
    finally:
        await stop_daemon(daemon)


async def wait_for_sessions(daemon, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(listing := (await daemon.get_json("/streams"))["sessions"]) != count:
        assert time.monotonic() < deadline, f"{len(listing)} sessions after {timeout:.0f} s: {listing}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def cors_daemon():
    started = await start_daemon(token=TOKEN, cors_origins=[APP_ORIGIN])
    started.headers = AUTH
    yield started
    await stop_daemon(started)


async def preflight(daemon, method: str, path: str, origin: str) -> aiohttp.ClientResponse:
    headers = {"Origin": origin, "Access-Control-Request-Method": method,
               "Access-Control-Request-Headers": "authorization,content-type"}
    async with daemon.http.options(f"{daemon.url}{path}", headers=headers) as response:
        await response.read()
        return response


async def test_listed_origin_gets_preflights_and_headers_on_every_endpoint(cors_daemon) -> None:
    for method, path in ROUTES:
        response = await preflight(cors_daemon, method, path, APP_ORIGIN)
        assert response.status == 200, (method, path)
        assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
        assert method in response.headers["Access-Control-Allow-Methods"]
        allowed = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
        assert allowed == {"authorization", "content-type"}
        assert response.headers["Access-Control-Max-Age"] == "600"
        # The token travels in a header, never in cookies.
        assert "Access-Control-Allow-Credentials" not in response.headers

        headers = {"Origin": APP_ORIGIN, **AUTH}
        async with cors_daemon.http.request(method, f"{cors_daemon.url}{path}", headers=headers, json={}) as answer:
            assert answer.headers.get("Access-Control-Allow-Origin") == APP_ORIGIN, (method, path, answer.status)
            exposed = answer.headers["Access-Control-Expose-Headers"].lower()
            assert {"location", "retry-after", "www-authenticate"} <= set(exposed.split(","))
    # Refusals carry the headers too, so the page can read why.
    async with cors_daemon.http.get(f"{cors_daemon.url}/streams", headers={"Origin": APP_ORIGIN}) as answer:
        assert answer.status == 401 and answer.headers["Access-Control-Allow-Origin"] == APP_ORIGIN


async def test_other_origins_get_no_cors_headers(cors_daemon) -> None:
    for method, path in ROUTES:
        response = await preflight(cors_daemon, method, path, OTHER_ORIGIN)
        assert response.status == 403, (method, path)
        assert not any(h.startswith("Access-Control-") for h in response.headers)
        headers = {"Origin": OTHER_ORIGIN, **AUTH}
        async with cors_daemon.http.request(method, f"{cors_daemon.url}{path}", headers=headers, json={}) as answer:
            assert not any(h.startswith("Access-Control-") for h in answer.headers), (method, path)
    text = await metrics_text(cors_daemon)
    assert metric(text, "kfgan_http_request_errors_total", route="/offer", reason="forbidden") == 1


async def test_no_cors_without_listed_origins() -> None:
    daemon = await start_daemon()
    try:
        response = await preflight(daemon, "POST", "/offer", APP_ORIGIN)
        assert response.status == 405
        assert not any(h.startswith("Access-Control-") for h in response.headers)
        async with daemon.http.get(f"{daemon.url}/readyz", headers={"Origin": APP_ORIGIN}) as answer:
            assert answer.status == 200
            assert not any(h.startswith("Access-Control-") for h in answer.headers)
    finally:
        await stop_daemon(daemon)
